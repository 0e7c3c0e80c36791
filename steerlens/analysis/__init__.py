"""Analyses of trained steering vectors: each module is a set of plain functions returning pandas tables.

`logit_lens` projects vectors on the unembedding, `stats` measures the stack itself, `clustering` groups
a layer's top tokens into topics (asking a chat model through `llm_client`, or offline), `report` runs
chosen analyses into one HTML report. `patching`, `first_token` and `propagation` measure the model's
response to the vectors; `mechanisms` and `studies` are the `steerlens study` commands as functions that
return tables and figures (a `results.StudyResult`).
"""
