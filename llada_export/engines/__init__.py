"""Backend runners (``runners.py``). The backend names live here, import-light, for the CLIs."""

BACKENDS = ("onnxruntime", "aoti", "inductor", "tensorrt")
