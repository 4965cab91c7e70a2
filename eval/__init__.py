"""Evaluation: Recall@K, zero-shot classification, run comparison."""
