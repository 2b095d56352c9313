"""Weight quantization shared by the exporter (which applies it) and the runtime (which loads
graphs holding its ops): ``fp8`` (e4m3 weights, dynamic e4m3 activations)."""
