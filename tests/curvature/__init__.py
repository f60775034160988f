"""Curvature maths: exactness against an independent oracle, curvlinops conformance, Fisher
types, embeddings, MAC."""
