"""The two training recipes (resnet/main.py and deit/main.py run these)."""
