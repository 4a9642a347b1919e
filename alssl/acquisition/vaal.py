"""VAAL: Variational Adversarial Active Learning (Sinha, Ebrahimi & Darrell 2019, arXiv 1904.00370).

A β-VAE learns a latent space of the pool's IMAGES (labeled and unlabeled), while a discriminator on the latent
means learns to tell labeled (1) from unlabeled (0); the VAE is also trained adversarially to make the
discriminator call every sample "labeled". The samples the discriminator is most sure are unlabeled (lowest
"labeled" probability) are the ones least represented by the labeled set, and are queried.

As in the paper's code: z_dim=32; encoder of 4×4 stride-2 conv + BN + ReLU blocks down to 2×2 (width doubling per
block), decoder from a 4×4 map with 4×4 stride-2 transposed convs and a final 1×1 transposed conv; discriminator
MLP 32→512→512→1; Adam lr 5e-4 for both; β=1; adversarial weight 1; 2 VAE steps per discriminator step, each on a
fresh labeled batch and a fresh unlabeled batch. Differences, all for speed on a CPU and documented:
first-layer width 32 (paper 128; knob `vaal_width`); training length `vaal_epochs` passes over the pool
(default 2; paper 100); the VAE loss is the per-sample ELBO (squared error summed over pixels + β·KL summed over
latent dims, both averaged over the batch). Images are scaled to [0, 1] and bilinearly resized to the next
power of two (≥ 8) when needed.

One implementation detail matters a lot: the labeled and the unlabeled batch go through the VAE in ONE forward
pass. Encoded separately (as the paper's code does), train-mode BatchNorm normalises each pool's batch with its
own statistics, so the discriminator learns on features in which a pool-level shift (e.g. all labeled images
dark, half the unlabeled ones bright) is normalised away, and is then queried on eval-mode features it never saw:
on that test case the separate passes made the final discriminator rate the bright, never-labeled images as the
MOST "labeled" (P ≈ 0.2–0.98 vs ≈ 0.1–0.4 for dark ones, 9 runs), the joint pass ranks them last (P ≈ 0.00–0.03).
"""

from __future__ import annotations

import math

import numpy as np

from alssl.acquisition.base import AcquisitionContext, lowest, option, require_labels
from alssl.errors import UserError

Z_DIM = 32


def _build(channels: int, size: int, width: int):
    import torch
    from torch import nn

    n_down = int(math.log2(size)) - 1  # size -> 2x2

    class VAE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            enc, c_in = [], channels
            for i in range(n_down):
                enc += [nn.Conv2d(c_in, width * 2**i, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2**i), nn.ReLU(True)]
                c_in = width * 2**i
            self.top = c_in
            self.encoder = nn.Sequential(*enc, nn.Flatten())
            self.fc_mu = nn.Linear(c_in * 4, Z_DIM)
            self.fc_logvar = nn.Linear(c_in * 4, Z_DIM)
            dec = []
            for i in reversed(range(n_down - 1)):
                dec += [nn.ConvTranspose2d(c_in, width * 2**i, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2**i),
                        nn.ReLU(True)]
                c_in = width * 2**i
            self.fc_dec = nn.Linear(Z_DIM, self.top * 16)
            self.decoder = nn.Sequential(*dec, nn.ConvTranspose2d(c_in, channels, 1))

        def encode(self, x):
            h = self.encoder(x)  # [B, top*4]
            return self.fc_mu(h), self.fc_logvar(h)  # [B, Z] each

        def forward(self, x, noise):
            mu, logvar = self.encode(x)
            z = mu + noise * torch.exp(0.5 * logvar)  # reparameterisation, noise ~ N(0, I) [B, Z]
            recon = self.decoder(self.fc_dec(z).view(-1, self.top, 4, 4))  # [B, C, S, S]
            return recon, mu, logvar

    disc = nn.Sequential(nn.Linear(Z_DIM, 512), nn.ReLU(True), nn.Linear(512, 512), nn.ReLU(True), nn.Linear(512, 1))
    return VAE(), disc


def _to_input(images: np.ndarray, size: int, device):
    """uint8 [B, H, W, C] -> float [B, C, size, size] in [0, 1]."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def vaal_select(ctx: AcquisitionContext, budget: int, rng: np.random.Generator) -> np.ndarray:
    """B unlabeled indices the VAAL discriminator finds least like the labeled set."""
    import torch
    import torch.nn.functional as F

    require_labels(ctx, "vaal")
    images = ctx.images
    if images is None:
        raise UserError("strategy vaal needs the training images; pass images= (uint8 [N, H, W, C]) or pick another strategy")
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or len(images) != len(ctx.labeled) or images.shape[-1] not in (1, 3):
        raise UserError(f"vaal images must be uint8 [N, H, W, C] with N={len(ctx.labeled)} and C in (1, 3) (got {images.shape})")
    epochs = option(ctx, "vaal_epochs", 2, float)
    batch = option(ctx, "vaal_batch_size", 64, int)
    width = option(ctx, "vaal_width", 32, int)
    device = torch.device(option(ctx, "device", "cuda" if torch.cuda.is_available() else "cpu", str))
    if epochs <= 0 or batch < 1 or width < 1:
        raise UserError(f"vaal needs vaal_epochs > 0, vaal_batch_size >= 1, vaal_width >= 1 (got {epochs}, {batch}, {width})")
    size = max(8, 2 ** math.ceil(math.log2(max(images.shape[1:3]))))
    lab, unl = np.flatnonzero(ctx.labeled), ctx.unlabeled_indices
    steps = max(1, math.ceil(epochs * len(images) / batch))
    g = np.random.default_rng(rng.integers(2**63 - 1))  # batches and reparameterisation noise
    fork = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(int(rng.integers(2**63 - 1)))
        vae, disc = (m.to(device) for m in _build(images.shape[-1], size, width))
        opt_vae = torch.optim.Adam(vae.parameters(), lr=5e-4)
        opt_disc = torch.optim.Adam(disc.parameters(), lr=5e-4)

        def draw(pool: np.ndarray):
            return _to_input(images[g.choice(pool, size=min(batch, len(pool)), replace=False)], size, device)

        def noise(n: int):
            return torch.from_numpy(g.standard_normal((n, Z_DIM), dtype=np.float32)).to(device)

        def elbo(x_l, x_u):
            """VAE loss of a labeled and an unlabeled batch, passed TOGETHER so BatchNorm statistics are shared."""
            x = torch.cat([x_l, x_u])  # [Bl + Bu, C, S, S]
            recon, mu, logvar = vae(x, noise(len(x)))
            rec = (recon - x).pow(2).flatten(1).sum(1)  # [B] squared error per sample
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)  # [B]
            per_sample = rec + 1.0 * kl  # beta = 1
            n = len(x_l)  # the paper sums the labeled and the unlabeled batch means
            return per_sample[:n].mean() + per_sample[n:].mean(), mu[:n], mu[n:]

        vae.train(), disc.train()
        for _ in range(steps):
            for _ in range(2):  # VAE steps: reconstruct both pools, fool the discriminator
                loss, mu_l, mu_u = elbo(draw(lab), draw(unl))
                d_l, d_u = disc(mu_l), disc(mu_u)  # [B, 1] logits
                adv = F.binary_cross_entropy_with_logits(d_l, torch.ones_like(d_l)) + \
                    F.binary_cross_entropy_with_logits(d_u, torch.ones_like(d_u))
                opt_vae.zero_grad(set_to_none=True)
                (loss + 1.0 * adv).backward()
                opt_vae.step()
            x_l, x_u = draw(lab), draw(unl)
            with torch.no_grad():  # discriminator step: labeled = 1, unlabeled = 0
                mu = vae.encode(torch.cat([x_l, x_u]))[0]  # [Bl + Bu, Z]
            d_l, d_u = disc(mu[: len(x_l)]), disc(mu[len(x_l) :])
            d_loss = F.binary_cross_entropy_with_logits(d_l, torch.ones_like(d_l)) + \
                F.binary_cross_entropy_with_logits(d_u, torch.zeros_like(d_u))
            opt_disc.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_disc.step()

        vae.eval(), disc.eval()
        scores = []
        with torch.no_grad():
            for i in range(0, len(unl), 512):
                mu = vae.encode(_to_input(images[unl[i : i + 512]], size, device))[0]
                scores.append(torch.sigmoid(disc(mu))[:, 0].double().cpu().numpy())  # P(labeled) [b]
    return lowest(np.concatenate(scores), unl, budget, rng)
