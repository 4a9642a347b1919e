"""VAAL: Variational Adversarial Active Learning (Sinha, Ebrahimi & Darrell 2019, arXiv 1904.00370).

A β-VAE learns a latent space of the pool's IMAGES (labeled and unlabeled), while a discriminator on the latent
means learns to tell labeled (1) from unlabeled (0); the VAE is also trained adversarially to make the
discriminator call every sample "labeled". The samples the discriminator is most sure are unlabeled (lowest
"labeled" probability) are the ones least represented by the labeled set, and are queried.

As the official code (sinhasam/vaal: `solver.py`, `model.py`, `sampler.py`, `main.py`):
- losses: vae_loss(x) = MSE(recon, x) averaged over every element + β·KL summed over the batch AND the latent dims;
  VAE objective = vae_loss(labeled) + vae_loss(unlabeled) + λ_adv·(BCE(D(μ_l), 1) + BCE(D(μ_u), 1)) with batch-mean
  BCE; discriminator objective = BCE(D(μ_l), 1) + BCE(D(μ_u), 0); β = 1, λ_adv = 1 (`vaal_loss`, `disc_loss`).
- the labeled and the unlabeled batch go through the VAE in SEPARATE forward passes (train-mode BatchNorm sees each
  pool on its own), for the VAE steps, the discriminator step and the final scoring alike.
- per iteration: 2 VAE steps (the second on freshly drawn labeled/unlabeled batches), then 1 discriminator step on
  those same batches (μ from the VAE under no_grad); iterations = ⌈epochs·N / batch⌉ with N the pool size; Adam
  lr 5e-4 for both; VAE and discriminator start from scratch at every query.
- architecture: z_dim = 32; encoder of 4×4 stride-2 conv (no bias) + BN + ReLU blocks down to 2×2, widths
  w, 2w, 4w, ... (official w = 128: 128-256-512-1024 for 32 px), fc_μ / fc_logvar from the flattened 2×2 map;
  decoder Linear(z, top·4·4) → 4×4 stride-2 transposed convs + BN + ReLU back to the input size → a 1×1 transposed
  conv to C channels; discriminator MLP 32→512→512→1; Kaiming-normal weights and zero biases on the encoder convs,
  the decoder's Linear and the discriminator (the official `weight_init` leaves fc_μ/fc_logvar and the transposed
  convs at PyTorch's defaults).
- inputs normalised to [-1, 1] (Normalize(0.5, 0.5)); random horizontal flips on colour images (the official CIFAR
  dataset flips, at training and at scoring); scoring = sigmoid(D(μ)) on the unlabeled pool in batches, VAE in
  train mode as the official sampler leaves it.
Differences, for a CPU and documented in docs/acquisition.md: defaults width 32 (`vaal_width`, official 128),
2 epochs (`vaal_epochs`, official 100), batch 64 (`vaal_batch_size`, official 128); images whose side is not a
power of two ≥ 8 are bilinearly resized to the next one (the official model only takes 32 px); no task model is
trained alongside (the official solver trains one to report accuracy; it does not influence the query).
"""

from __future__ import annotations

import math

import numpy as np

from alssl.acquisition.base import AcquisitionContext, lowest, option, require_labels
from alssl.errors import UserError

Z_DIM = 32
BETA = 1.0  # official --beta
ADV_WEIGHT = 1.0  # official --adversary_param (λ2 in the paper)
VAE_STEPS = 2  # official --num_vae_steps (the discriminator takes --num_adv_steps = 1)
LR = 5e-4


def vae_loss(x, recon, mu, logvar, beta: float = BETA):
    """Official `Solver.vae_loss`: mean squared error over all B·C·H·W elements + β·KL summed over batch and dims."""
    import torch.nn.functional as F

    kld = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum()  # scalar, summed over [B, Z]
    return F.mse_loss(recon, x) + beta * kld


def vaal_loss(lab: tuple, unl: tuple, d_l, d_u, *, beta: float = BETA, adv: float = ADV_WEIGHT):
    """VAE objective from (x, recon, mu, logvar) of each pool and the discriminator logits [B, 1] of their μ."""
    import torch
    import torch.nn.functional as F

    fool = F.binary_cross_entropy_with_logits(d_l, torch.ones_like(d_l)) + \
        F.binary_cross_entropy_with_logits(d_u, torch.ones_like(d_u))  # both pools called "labeled"
    return vae_loss(*lab, beta=beta) + vae_loss(*unl, beta=beta) + adv * fool


def disc_loss(d_l, d_u):
    """Discriminator objective: labeled μ → 1, unlabeled μ → 0 (batch-mean BCE on logits [B, 1])."""
    import torch
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(d_l, torch.ones_like(d_l)) + \
        F.binary_cross_entropy_with_logits(d_u, torch.zeros_like(d_u))


def build(channels: int, size: int, width: int):
    """(VAE, discriminator) as the official model.py, for square inputs of side `size` (a power of two ≥ 8)."""
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
            dec: list[nn.Module] = [nn.Linear(Z_DIM, self.top * 16), nn.Unflatten(1, (self.top, 4, 4))]
            for i in reversed(range(n_down - 1)):
                dec += [nn.ConvTranspose2d(c_in, width * 2**i, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2**i),
                        nn.ReLU(True)]
                c_in = width * 2**i
            self.decoder = nn.Sequential(*dec, nn.ConvTranspose2d(c_in, channels, 1))

        def forward(self, x, noise):  # x [B, C, S, S], noise [B, Z] ~ N(0, I)
            h = self.encoder(x)  # [B, top·4]
            mu, logvar = self.fc_mu(h), self.fc_logvar(h)  # [B, Z] each
            z = mu + noise * torch.exp(0.5 * logvar)  # reparameterisation
            return self.decoder(z), mu, logvar  # [B, C, S, S], [B, Z], [B, Z]

    disc = nn.Sequential(nn.Linear(Z_DIM, 512), nn.ReLU(True), nn.Linear(512, 512), nn.ReLU(True), nn.Linear(512, 1))
    vae = VAE()
    for m in [*vae.encoder, *vae.decoder, *disc]:
        if type(m) in (nn.Conv2d, nn.Linear):  # the official kaiming_init: not ConvTranspose2d
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return vae, disc


def _to_input(images: np.ndarray, size: int, device, flip: np.ndarray | None = None):
    """uint8 [B, H, W, C] -> float [B, C, size, size] in [-1, 1], rows with flip[i] mirrored left-right."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if flip is not None and flip.any():
        f = torch.from_numpy(flip).to(device)
        x[f] = x[f].flip(3)
    return x


def vaal_select(ctx: AcquisitionContext, budget: int, rng: np.random.Generator) -> np.ndarray:
    """B unlabeled indices the VAAL discriminator finds least like the labeled set."""
    import torch

    require_labels(ctx, "vaal")
    images = ctx.images
    if images is None:
        raise UserError("strategy vaal needs the training images; "
                        "pass images= (uint8 [N, H, W, C]) or pick another strategy")
    if not hasattr(images, "shape"):  # an array or an on-disk DiskPool (read batch by batch) stay as they are
        images = np.asarray(images)
    if images.ndim == 3:
        images = np.asarray(images)[..., None]
    if images.ndim != 4 or len(images) != len(ctx.labeled) or images.shape[-1] not in (1, 3):
        raise UserError(f"vaal images must be uint8 [N, H, W, C] with N={len(ctx.labeled)} and C in (1, 3) "
                        f"(got {images.shape})")
    epochs = option(ctx, "vaal_epochs", 2, float)
    batch = option(ctx, "vaal_batch_size", 64, int)
    width = option(ctx, "vaal_width", 32, int)
    device = torch.device(option(ctx, "device", "cuda" if torch.cuda.is_available() else "cpu", str))
    if epochs <= 0 or batch < 1 or width < 1:
        raise UserError("vaal needs vaal_epochs > 0, vaal_batch_size >= 1, vaal_width >= 1 "
                        f"(got {epochs}, {batch}, {width})")
    size = max(8, 2 ** math.ceil(math.log2(max(images.shape[1:3]))))
    flips = images.shape[-1] == 3  # the official CIFAR dataset flips; 1-channel glyphs are not mirror-symmetric
    lab, unl = np.flatnonzero(ctx.labeled), ctx.unlabeled_indices
    steps = max(1, math.ceil(epochs * len(images) / batch))
    g = np.random.default_rng(rng.integers(2**63 - 1))  # batches, flips and reparameterisation noise
    fork = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(int(rng.integers(2**63 - 1)))
        vae, disc = (m.to(device) for m in build(images.shape[-1], size, width))
        opt_vae = torch.optim.Adam(vae.parameters(), lr=LR)
        opt_disc = torch.optim.Adam(disc.parameters(), lr=LR)

        def inputs(idx: np.ndarray):
            return _to_input(images[idx], size, device, g.random(len(idx)) < 0.5 if flips else None)

        def draw(pool: np.ndarray):
            return inputs(g.choice(pool, size=min(batch, len(pool)), replace=False))

        def forward(x):  # one pool's own train-mode pass: (x, recon, mu, logvar)
            noise = torch.from_numpy(g.standard_normal((len(x), Z_DIM), dtype=np.float32)).to(device)
            return (x, *vae(x, noise))

        vae.train(), disc.train()
        for _ in range(steps):
            x_l, x_u = draw(lab), draw(unl)
            for count in range(VAE_STEPS):  # VAE: reconstruct both pools, make the discriminator say "labeled"
                out_l, out_u = forward(x_l), forward(x_u)
                loss = vaal_loss(out_l, out_u, disc(out_l[2]), disc(out_u[2]))
                opt_vae.zero_grad(set_to_none=True)
                loss.backward()
                opt_vae.step()
                if count < VAE_STEPS - 1:
                    x_l, x_u = draw(lab), draw(unl)
            with torch.no_grad():  # discriminator step on the last drawn batches
                mu_l, mu_u = forward(x_l)[2], forward(x_u)[2]
            d = disc_loss(disc(mu_l), disc(mu_u))
            opt_disc.zero_grad(set_to_none=True)
            d.backward()
            opt_disc.step()

        scores = np.empty(len(unl))
        order = g.permutation(len(unl))  # the official sampler walks the unlabeled pool in shuffled batches
        with torch.no_grad():
            for i in range(0, len(unl), batch):
                part = order[i : i + batch]
                mu = forward(inputs(unl[part]))[2]
                scores[part] = torch.sigmoid(disc(mu))[:, 0].double().cpu().numpy()  # P(labeled) [b]
    return lowest(scores, unl, budget, rng)
