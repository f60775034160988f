"""PINN support: forward Laplacian, PINN curvature, PINN optimizers."""
