"""Accuracy benchmark: how much real accuracy survives structured pruning, with and without compensation.

Every model is scored on real labelled data that ships offline (scikit-learn digits, rendered text lines
for the PP-OCR recognizer, hand-written sentences for MiniLM); see run.py for the method table.
"""
