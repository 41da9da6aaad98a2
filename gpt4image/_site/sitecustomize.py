"""Put on PYTHONPATH for vLLM's own processes (engine core, model inspection) on a CPU build of
torch: they import torchvision, which needs gpt4image._compat's operator schemas first."""
try:
    from gpt4image._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
except Exception:  # noqa: BLE001  never stop an interpreter from starting
    pass
