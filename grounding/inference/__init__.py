"""Answering questions: ``Grounder`` (predictor.py), ``PrefixEngine`` (engine.py) and the steps they share."""
