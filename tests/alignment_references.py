"""The alignment losses written out sample by sample (loops over the batch), independently of the
matrix forms in gpt4image/losses.py, for the tests to compare values and gradients with."""
import math

import torch


def _unit(v):
    return v / torch.sqrt((v * v).sum())


def _dot(a, b):
    return (a * b).sum()


def clip(z, t, tau, **_):
    n = len(z)
    zs = [_unit(v) for v in z]
    sim = [[_dot(zs[i], t[j]) / tau for j in range(n)] for i in range(n)]
    i2t = sum(torch.log(sum(torch.exp(sim[i][j]) for j in range(n))) - sim[i][i] for i in range(n)) / n
    t2i = sum(torch.log(sum(torch.exp(sim[i][j]) for i in range(n))) - sim[j][j] for j in range(n)) / n
    return (i2t + t2i) / 2


def cos(z, t, **_):
    return sum(1 - _dot(z[i], t[i]) / (torch.sqrt(_dot(z[i], z[i])) * torch.sqrt(_dot(t[i], t[i])))
               for i in range(len(z))) / len(z)


def l2(z, t, **_):
    return sum(((z[i] - t[i]) ** 2).sum() for i in range(len(z))) / z.numel()


def kl(z, t, **_):
    n, d = z.shape
    total = 0
    for k in range(d):  # each dimension's distribution over the batch
        zsum = sum(torch.exp(z[i, k]) for i in range(n))
        tsum = sum(torch.exp(t[i, k]) for i in range(n))
        for i in range(n):
            p = torch.exp(t[i, k]) / tsum
            total = total + p * (torch.log(p) - torch.log(torch.exp(z[i, k]) / zsum))
    return total / n


def _distances(x):
    n = len(x)
    return [[torch.sqrt(((x[i] - x[j]) ** 2).sum()) if i != j else x[i, 0] * 0 for j in range(n)] for i in range(n)]


def dist(z, t, **_):
    dz, dt = _distances(z), _distances(t)
    n = len(z)
    nz = torch.sqrt(sum(dz[i][j] ** 2 for i in range(n) for j in range(n)))
    nt = torch.sqrt(sum(dt[i][j] ** 2 for i in range(n) for j in range(n)))
    return torch.sqrt(sum((dz[i][j] / nz - dt[i][j] / nt) ** 2 for i in range(n) for j in range(n)))


def vl2lite_text(z, t, **_):
    temperature, n = 2.0, len(z)
    zs, ts = [_unit(v) for v in z], [_unit(v) for v in t]
    total = 0
    for j in range(n):  # softmax over dimension 0: column j's distribution over the images i
        student = [_dot(zs[i], ts[j]) / temperature for i in range(n)]
        teacher = [_dot(ts[i], ts[j]) / temperature for i in range(n)]
        s_norm = torch.log(sum(torch.exp(s) for s in student))
        t_norm = torch.log(sum(torch.exp(s) for s in teacher))
        for i in range(n):
            log_p = teacher[i] - t_norm
            total = total + torch.exp(log_p) * (log_p - (student[i] - s_norm))
    return temperature ** 2 * total / n


def sigmoid(z, t, log_scale=None, bias=None, **_):
    if log_scale is None:
        log_scale, bias = torch.tensor(math.log(10.0), dtype=z.dtype), torch.tensor(-10.0, dtype=z.dtype)
    n = len(z)
    zs, ts = [_unit(v) for v in z], [_unit(v) for v in t]
    total = 0
    for i in range(n):
        for j in range(n):
            sign = 1.0 if i == j else -1.0
            logit = torch.exp(log_scale) * _dot(zs[i], ts[j]) + bias
            total = total + torch.log(1 + torch.exp(-sign * logit))
    return total / n


def supcon(z, t, tau, labels, **_):
    n = len(z)
    views = [_unit(v) for v in z] + [_unit(v) for v in t]
    sample = list(range(n)) + list(range(n))
    rows = [tuple(t[i].tolist()) for i in range(n)]
    total = 0
    for a in range(2 * n):
        positives = [p for p in range(2 * n) if p != a and (int(labels[sample[p]]) == int(labels[sample[a]])
                                                            or rows[sample[p]] == rows[sample[a]])]
        log_norm = torch.log(sum(torch.exp(_dot(views[a], views[k]) / tau) for k in range(2 * n) if k != a))
        total = total + sum(log_norm - _dot(views[a], views[p]) / tau for p in positives) / len(positives)
    return total / (2 * n)


REFERENCES = {"clip": clip, "cos": cos, "l2": l2, "kl": kl, "dist": dist, "vl2lite-text": vl2lite_text,
              "sigmoid": sigmoid, "supcon": supcon}
WITH_NEGATIVES = ["clip", "kl", "dist", "sigmoid", "supcon", "vl2lite-text"]
