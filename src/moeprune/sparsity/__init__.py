"""Unstructured and semi-structured (N:M) sparsity inside routed experts: Wanda scores, OWL layer sparsities."""
