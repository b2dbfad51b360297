"""Runs on disk: checkpoints and `Run` (`checkpoints`), GGUF files and the embedded default model (`gguf`), a
transformers Trainer's output folder (`trainer_output`)."""
