"""LPIPS term of the second stage (EDM backbones), taken from the maintained `piq` package as the paper does.

piq needs torchvision and downloads the VGG16 and LPIPS weights on first use (into torch's hub cache). Without
them the run stops with one clear line; `--lpips False` trains without the term.
"""

import torch


class PerceptualUnavailable(RuntimeError):
    pass


_HINT = ("the second stage's LPIPS term needs the 'piq' package (pip install piq; it brings torchvision) and its "
         "VGG16/LPIPS weights in torch's hub cache ({hub}); install/download them or pass --lpips False")


class PerceptualLoss(torch.nn.Module):
    """LPIPS(VGG16, average pooling) between images resized bilinearly to 224², per sample."""

    def __init__(self, device="cpu", cache_root=None, factory=None):
        super().__init__()
        hint = _HINT.format(hub=torch.hub.get_dir())
        try:
            if factory is None:
                import piq  # noqa: F401 - optional dependency

                factory = lambda: piq.LPIPS(replace_pooling=True, reduction="none")  # noqa: E731
            self.lpips = factory().to(device).eval().requires_grad_(False)
        except ImportError as e:
            raise PerceptualUnavailable(f"{hint} [{type(e).__name__}: {e}]") from None
        except Exception as e:  # a failed weight download surfaces as many different exception types
            raise PerceptualUnavailable(f"{hint} [{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]") from None

    def forward(self, a, b):
        a = torch.nn.functional.interpolate(a.float(), size=(224, 224), mode="bilinear", align_corners=False)
        b = torch.nn.functional.interpolate(b.float(), size=(224, 224), mode="bilinear", align_corners=False)
        return self.lpips(a, b).reshape(a.shape[0])
