"""Models the library has never seen, built from standard torch.nn layers, with an example input."""

import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn(self.conv1(x)))))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 5, stride=2, padding=2)
        self.blocks = nn.ModuleList([Residual(), Residual()])
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise: left dense
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        x = self.dw(x)
        return self.head(x.mean((2, 3)))


class TokenModel(nn.Module):
    """Embedding + attention + MLP + LSTM: several layers tensorslim must skip with a reason."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32), nn.LayerNorm(32)
        )
        self.rnn = nn.LSTM(32, 24, batch_first=True)
        self.out = nn.Linear(24, 50)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.mlp(h)
        h, _ = self.rnn(h)
        return self.out(h)


class Audio1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(4, 32, 7, stride=2, padding=3),
            nn.ReLU(),
            nn.Conv1d(32, 64, 5, dilation=2, padding=4),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Dropout(0.1),
            nn.Linear(64, 8),
        )

    def forward(self, x):
        return self.net(x)


def mlp():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.Tanh(),
        nn.Linear(256, 10),
    )


MODELS = {
    "mlp": (mlp, lambda: torch.randn(4, 1, 8, 8)),
    "resnetish": (ResNetish, lambda: torch.randn(2, 3, 32, 32)),
    "tokens": (TokenModel, lambda: torch.randint(0, 50, (2, 12))),
    "audio1d": (Audio1d, lambda: torch.randn(2, 4, 100)),
}
