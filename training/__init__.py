"""Training of the embedded default model: data generator, recipe, VAE/T5/transformer stages, detector, eval.

A consumer of `model/` and `weights/`, as `server/` is; nothing in those imports it (the CLI's
train-default and eval subcommands load it lazily). See docs/default-model.md.
"""
