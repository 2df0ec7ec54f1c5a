"""Andromeda: one configurable decoder-only language model, with training, evaluation and
fast inference. See README.md for the command line; the Python entry points are
`andromeda.model.ModelConfig`, `andromeda.model.Transformer` and `andromeda.presets`."""

__version__ = "0.1.0"
