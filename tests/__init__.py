"""The test suite: a package, so that modules with the same basename in different folders do not
clash (see README.md)."""
