"""Obviously-correct depthwise-convolution weight gradient, in float64.

The definition written out, one kernel tap at a time: the gradient of tap (i, j) of
channel c is the sum, over every image and output pixel, of the output gradient times
the padded input pixel that tap reads.  The fast paths are tested against this.
"""
import torch
import torch.nn.functional as F


def depthwise_weight_grad_naive(grad_out: torch.Tensor, x: torch.Tensor, kernel_size, stride, padding) -> torch.Tensor:
    """d loss / d weight, (C, 1, kh, kw), of ``F.conv2d(x, weight, stride=stride, padding=padding, groups=C)``
    given ``grad_out`` (B, C, Ho, Wo).  Returns float64."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    g, x = grad_out.double(), x.double()
    Ho, Wo = g.shape[-2:]
    padded = F.pad(x, (pw, pw, ph, ph))
    grad = torch.zeros(x.shape[1], 1, kh, kw, dtype=torch.float64, device=x.device)
    for i in range(kh):
        for j in range(kw):
            seen = padded[:, :, i:i + sh * (Ho - 1) + 1:sh, j:j + sw * (Wo - 1) + 1:sw]
            grad[:, 0, i, j] = (g * seen).sum((0, 2, 3))
    return grad
