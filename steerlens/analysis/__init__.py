"""Analyses of trained steering vectors: each module is a set of plain functions returning pandas tables.

`logit_lens` projects vectors on the unembedding, `stats` measures the stack itself, `clustering` groups
a layer's top tokens into topics, `report` runs chosen analyses and writes one HTML report.
"""
