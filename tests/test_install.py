"""The package makes torchvision, timm and clip importable, whatever build of torchvision is installed."""
import subprocess
import sys


def test_torchvision_timm_and_clip_import_through_the_package_in_a_fresh_interpreter():
    code = ("import gpt4image, torchvision, timm, torch; from gpt4image._compat import import_clip; "
            "clip = import_clip(); m = torchvision.models.resnet18(num_classes=3).eval(); "
            "assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 3); "
            "assert timm.create_model('deit_tiny_patch16_224', num_classes=3, img_size=32) is not None; "
            "assert clip.tokenize(['a cat']).shape == (1, 77); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_compat_is_a_no_op_once_the_operator_exists():
    import torch
    from gpt4image._compat import ensure_torchvision_importable, _operator_exists
    import torchvision  # noqa: F401
    assert _operator_exists("nms")
    # A second call must not register anything new (it would raise on a duplicate definition).
    ensure_torchvision_importable()
    assert torch.ops.torchvision.nms is not None
