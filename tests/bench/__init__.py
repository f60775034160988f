"""Smoke and unit tests of the scripts in bench/ and of the MNIST demo."""
