"""A Seldon MLServer runtime computing sealbox's demo model (client/demo_model.py) with numpy.

MLServer has no MLX runtime, so this custom runtime does the same computation
(x @ W0.T + b0, ReLU, @ W1.T + b1, float32) on the same weights (weights.npz
written by bench_mlserver.py). It runs inside MLServer's own virtualenv,
started by benchmarks/bench_mlserver.py; nothing in sealbox imports it.
"""
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class DemoMLP(MLModel):
    async def load(self) -> bool:
        with np.load(await get_model_uri(self.settings)) as weights:
            self.weights = {k: weights[k] for k in ("w0", "b0", "w1", "b1")}
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        w = self.weights
        x = NumpyCodec.decode_input(payload.inputs[0])
        hidden = x @ w["w0"].T + w["b0"]
        hidden = hidden * (hidden > 0)
        y = (hidden @ w["w1"].T + w["b1"]).astype(np.float32)
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("y", y)])
