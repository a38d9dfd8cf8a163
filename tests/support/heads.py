"""A KNOWN head's parameters in the forms the kernel tests compare against."""
import torch

from know_kernels import KNOWNHead
from know_kernels.kernels.packing import pack


def params64(head, device=None, *, requires_grad=False):
    """The head's parameters in float64 (on ``device`` if given), detached from the head."""
    return {k: v.detach().to(device=device, dtype=torch.float64).requires_grad_(requires_grad)
            for k, v in head.params_dict().items()}


def packed_of(head, device="cpu"):
    """The packed (folded) parameter vector the fused kernels read."""
    return pack({k: v.detach() for k, v in head.params_dict().items()}, head.S).to(device)


def make_head(S, norm, seed, *, biases=True):
    """A head with the authors' init and, unless biases=False, random biases (a fresh head
    has zero biases, which would leave their gradients' paths half tested)."""
    head = KNOWNHead(S, norm, seed=seed)
    if biases:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in head.params_dict().items():
                if name.split(".")[-1].startswith("b"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return head


def relative_error(got, want):
    """‖got − want‖ / ‖want‖, with want in float64."""
    return ((got.double() - want).norm() / want.norm()).item()
