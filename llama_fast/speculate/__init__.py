"""Speculative decoding: one loop for every proposer (speculative.py: a draft model, prompt lookup) and lookahead
decoding (lookahead.py)."""
