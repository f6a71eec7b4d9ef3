"""RAVEL counterfactual data: examples, per-model filtering, caching and collation."""
