"""EDM's denoising score-matching loss (Karras et al. 2022, Sec. 5 and Table 1), used to train a teacher.

    sigma ~ exp(N(P_mean, P_std^2))                       (log-normal noise levels, Table 1 "p_train")
    lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2        (loss weight, Table 1)
    loss = lambda(sigma) * |D(y + sigma n, sigma) - y|^2,  n ~ N(0, I)          (Eq. 2 with Eq. 8)

The weight makes the effective target of the raw network F unit-variance at every sigma.
"""

import torch


class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def sample_sigma(self, batch, device, generator=None):
        """Noise levels [batch, 1, 1, 1] from the log-normal training distribution."""
        rnd_normal = torch.randn([batch, 1, 1, 1], device=device, generator=generator)
        return (rnd_normal * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def __call__(self, net, images, class_labels=None, augment_labels=None, generator=None):
        """Per-element weighted loss [N, C, H, W] for clean images in [-1, 1]; callers sum and divide by N."""
        sigma = self.sample_sigma(images.shape[0], images.device, generator)
        noise = torch.randn(images.shape, device=images.device, generator=generator) * sigma
        denoised = net(images + noise, sigma.flatten(), class_labels=class_labels, augment_labels=augment_labels)
        return self.weight(sigma) * (denoised - images) ** 2
