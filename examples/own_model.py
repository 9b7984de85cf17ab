"""RDR in your own training loop: a torchvision model, your labels, rdr_fast.RDRLoss.

Runs on the CPU in well under a minute, on generated long-tailed data (class c has
images drawn around its own mean, 200·0.5^c of them), so it needs no download:

    python examples/own_model.py
"""
import torch
import torchvision

import rdr_fast
from rdr_fast.data import class_counts
from rdr_fast.models import with_features


def long_tailed_images(num_classes=5, n_max=200, seed=0):
    """Images [N, 3, 16, 16] whose class shows as a mean shift, class c with n_max·0.5^c samples."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((max(4, int(n_max * 0.5 ** c)),), c) for c in range(num_classes)])
    means = torch.randn(num_classes, 3, 1, 1, generator=g)
    images = means[labels] + torch.randn(len(labels), 3, 16, 16, generator=g)
    return images, labels


def main(epochs=4, batch_size=64):
    torch.manual_seed(0)
    images, labels = long_tailed_images()
    counts = class_counts(labels)                         # samples per class, from the labels
    model = with_features(torchvision.models.resnet18(num_classes=len(counts)))  # forward -> (features, logits)
    criterion = rdr_fast.RDRLoss(counts, feat_dim=model.feat_dim, reweight="rdr", base="ce",
                                 warmup_steps=5)          # RDR weights after 5 steps of plain CE
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=batch_size,
                                         shuffle=True)
    for epoch in range(epochs):
        model.train()
        criterion.train()                                 # prototypes follow the features
        hits, seen = torch.zeros(len(counts)), torch.zeros(len(counts))
        for x, y in loader:
            features, logits = model(x)
            loss = criterion(features, logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            hits.index_add_(0, y, (logits.argmax(1) == y).float())
            seen.index_add_(0, y, torch.ones(len(y)))
        per_class = (hits / seen).tolist()                # accuracy on the batches as they were trained
        print(f"epoch {epoch + 1}: last loss {loss.item():.3f}, per-class accuracy (head to tail) "
              + " ".join(f"{a:.2f}" for a in per_class))
    return per_class


if __name__ == "__main__":
    main()
