"""A trained checkpoint as an MLflow model (models from code: this file is the model's code,
the checkpoint folder its one artifact, so nothing is pickled).

    model = mlflow.pyfunc.load_model("models:/<model id>")
    model.predict([[2023, 2003, ...], ...])        # token ids of the tasks' tokenizer -> answers

`rmt.tracking.Run.log_model` logs it; `checkpoint_of(model_uri)` downloads the checkpoint
folder, which `RecurrentMemoryEncoder.from_pretrained` (or the decoder's) loads as it is.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

CHECKPOINT_ARTIFACT = "checkpoint"


class RecurrentMemoryPyfunc(PythonModel):
    """Answers for token-id sequences of any length, streamed one segment at a time."""

    def load_context(self, context) -> None:
        import torch

        from rmt.hub import load_tokenizer
        from rmt.model.base import read_checkpoint_config
        from rmt.objective import objective_for

        checkpoint = context.artifacts[CHECKPOINT_ARTIFACT]
        self.classes = list(context.model_config["classes"])
        architecture = read_checkpoint_config(checkpoint).architecture
        self.objective = objective_for(architecture, classes=self.classes, tokenizer=load_tokenizer(checkpoint))
        self.model = self.objective.load(checkpoint)
        self.torch = torch

    def predict(self, context, model_input: list[list[int]], params=None) -> list[str]:
        """The answer to each token-id sequence (the type hints are the model's signature:
        MLflow checks inputs against them)."""
        answers = []
        with self.torch.inference_mode():
            for row in model_input:  # one at a time: the rows may differ in length
                tokens = self.torch.as_tensor([list(row)], dtype=self.torch.long)
                scores = self.objective.class_logits(self.model, tokens)
                answers.append(self.classes[int(scores.argmax(-1))])
        return answers


mlflow.models.set_model(RecurrentMemoryPyfunc())
