import subprocess
import sys


def test_timm_model_builds_after_importing_ssageo():
    # A fresh interpreter: the fallback must be in place before torchvision's first import.
    # `import ssageo` stays light (no torch); timm's import of torchvision runs the fallback.
    code = (
        "import sys, ssageo\n"
        "assert 'torch' not in sys.modules and 'ssageo._compat' not in sys.modules\n"
        "import timm, torch\n"
        "assert 'ssageo._compat' in sys.modules\n"
        "m = timm.create_model('convnext_atto', pretrained=False)\n"
        "y = m(torch.zeros(1, 3, 32, 32))\n"
        "print(tuple(y.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(1, 1000)"


def test_nms_fallback_matches_greedy_definition():
    import torch

    from ssageo._compat import nms_cpu

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # box 3 (0.95) suppresses box 0 (IoU 0.9) and box 1 (IoU ~0.62); box 2 is disjoint.
    assert nms_cpu(boxes, scores, 0.5).tolist() == [3, 2]
    assert nms_cpu(boxes, scores, 0.95).tolist() == [3, 0, 1, 2]
    # The registered operator (native or fallback) agrees.
    assert torch.ops.torchvision.nms(boxes, scores, 0.5).tolist() == [3, 2]
