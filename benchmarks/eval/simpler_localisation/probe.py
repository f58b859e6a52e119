"""Can a network read where the object is from SIMPLER-Bridge's first frame? A localisation probe.

The expert's first moves are a clipped proportional step from the gripper's start (the same every episode) towards
the object, so the sum of the first 3 moves' (x, y) is a function of the object's place in the first image. Episodes
0-809 of the dataset train, 810-899 are held out; printed every 100 steps: the mean absolute error (cm) of that
sum on 90 training and the held-out episodes, against the constant (mean) prediction's. Batches of 32, AdamW 3e-4.

    python probe.py DATASET cnn-regression STEPS  # a small conv stem + spatial softmax -> MLP, MSE
    python probe.py DATASET cnn-flow STEPS        # the same features conditioning a flow-matching head
    python probe.py DATASET CHECKPOINT STEPS      # the reference VLA from CHECKPOINT, its own loss (flow
                                                  # matching through the LM's cognition feature), approach frames
                                                  # (t < 3) only
"""
import sys
import time

import numpy as np
import torch
from torch import nn

from vla_runtime.data.episodes import EpisodeStore
from vla_runtime.data.torch_dataset import ActionChunkDataset
from vla_runtime.policies.ref_vla.checkpoint import load_model
from vla_runtime.policies.ref_vla.policy import RefVLAPolicy
from vla_runtime.policies.ref_vla.processing_ref_vla import images_to_tensor, tokenize
from vla_runtime.types import Observation

torch.set_num_threads(2)
torch.manual_seed(0)
dataset, model_name, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
episodes = list(EpisodeStore(dataset))
camera = next(iter(episodes[0].images))
train, held = episodes[:810], episodes[810:900]
target = torch.tensor(np.stack([e.action[:3, :2].sum(0) * 100 for e in episodes])).float()  # cm
print(f"constant prediction: held-out error {(target[810:900] - target[:810].mean(0)).abs().mean(0).numpy().round(2)}")


class SpatialSoftmaxNet(nn.Module):
    """Three stride-2 conv stages (the reference VLA's stem) -> 32 soft-argmax keypoints -> MLP."""

    def __init__(self, outputs: int, extra: int = 0):
        super().__init__()
        layers, previous = [], 3
        for width in (32, 64, 128):
            layers += [nn.Conv2d(previous, width, 3, 2, 1), nn.GroupNorm(8, width), nn.GELU()]
            previous = width
        self.stem, self.maps = nn.Sequential(*layers), nn.Conv2d(128, 32, 1)
        self.head = nn.Sequential(nn.Linear(64 + extra, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                                  nn.Linear(256, outputs))

    def keypoints(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.maps(self.stem(images))
        weights = maps.flatten(2).softmax(-1).view_as(maps)
        xs, ys = torch.linspace(-1, 1, maps.shape[-1]), torch.linspace(-1, 1, maps.shape[-2])
        return torch.cat([(weights.sum(-2) * xs).sum(-1), (weights.sum(-1) * ys).sum(-1)], dim=1)


def cnn_probe(flow: bool) -> None:
    images = torch.from_numpy(np.stack([e.images[camera][0] for e in episodes])).permute(0, 3, 1, 2).float()
    images = images / 127.5 - 1
    moves = torch.tensor(np.stack([e.action[:3, :2] * 20 for e in episodes])).float().flatten(1)  # [-1, 1]
    net = SpatialSoftmaxNet(6, extra=7 if flow else 0)

    def predict(index: slice) -> torch.Tensor:
        features = net.keypoints(images[index])
        if not flow:
            return net.head(features)
        x = torch.randn(features.shape[0], 6, generator=torch.Generator().manual_seed(0))
        for step in range(10):
            x = x + net.head(torch.cat([features, x, torch.full((len(x), 1), step / 10)], 1)) / 10
        return x

    optimizer, started = torch.optim.AdamW(net.parameters(), 3e-4), time.time()
    for step in range(1, steps + 1):
        index = torch.randint(0, 810, (32,))
        features, truth = net.keypoints(images[index]), moves[index]
        if flow:
            noise, t = torch.randn_like(truth), torch.rand(32, 1)
            velocity = net.head(torch.cat([features, (1 - t) * noise + t * truth, t], 1))
            loss = ((velocity - (truth - noise)) ** 2).mean()
        else:
            loss = ((net.head(features) - truth) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            with torch.no_grad():
                errors = [(predict(part).view(-1, 3, 2).sum(1) * 5 - target[part]).abs().mean(0).numpy().round(2)
                          for part in (slice(0, 90), slice(810, 900))]
            print(f"step {step} {time.time() - started:.0f} s: train {errors[0]}, held out {errors[1]}", flush=True)


def vla_probe(checkpoint: str) -> None:
    model, normalizer, tokenizer = load_model(checkpoint)
    data = ActionChunkDataset(train, model.config.chunk_size)
    data._frames = [(e, t) for e, t in data._frames if t < 3]  # the approach: where the object's place decides
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, drop_last=True)
    tokens = {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)

    def error(part: list) -> np.ndarray:
        policy, errors = RefVLAPolicy(model, normalizer, tokenizer), []
        for episode in part[::3]:
            policy.reset()
            obs = Observation({camera: episode.images[camera][0]}, episode.state[0].astype(np.float32),
                              episode.instruction, 0.0)
            moves = policy.predict_chunk(obs).actions[:3, :2].sum(0)
            errors.append(np.abs(moves - episode.action[:3, :2].sum(0)) * 100)
        model.train()
        return np.mean(errors, 0).round(2)

    print(f"start: train {error(train[:90])}, held out {error(held)}", flush=True)
    started, step = time.time(), 0
    while step < steps:
        for batch in loader:
            ids, mask = zip(*(tokens.setdefault(text, tokenize(tokenizer, [text], model.config.max_text_tokens))
                              for text in batch["instruction"]), strict=True)
            loss = model.loss(images_to_tensor(batch["images"][camera][:, None]), torch.cat(ids), torch.cat(mask),
                              normalizer.state(batch["state"]), normalizer.action(batch["actions"]),
                              batch["action_is_pad"])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % 100 == 0:
                print(f"step {step} {time.time() - started:.0f} s: train {error(train[:90])}, "
                      f"held out {error(held)}", flush=True)
            if step == steps:
                break


if model_name in ("cnn-regression", "cnn-flow"):
    cnn_probe(flow=model_name == "cnn-flow")
else:
    vla_probe(model_name)
