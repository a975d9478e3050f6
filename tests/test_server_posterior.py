"""/complete without a label on a conditional model: each completion's class is drawn from
p(class | kept rows) and reported as class_probabilities, which equal what /likelihood's per-pixel NLL
under each class says about the kept rows (Bayes' rule with a uniform prior)."""

from __future__ import annotations

import math

import pytest
import torch

from app.imaging import png_bytes
from app.model import sample_naive
from tests.helpers import SERVER_CLASS_NAMES, png_tensor, sse_events

pytestmark = pytest.mark.anyio


def top(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (1, 8, 8), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


async def complete(client, image: torch.Tensor, **fields):
    data = {"model": "cond", **{k: str(v) for k, v in fields.items()}}
    return await client.post("/complete", data=data, files={"image": ("top.png", png_bytes(image), "image/png")})


async def test_unlabelled_completion_reports_the_posterior_of_the_kept_rows(serve):
    image = top()
    rows = 3
    async with serve() as (_, client):
        response = await complete(client, image, rows=rows, n=4, seed=8)
        assert response.status_code == 200, response.text
        body = response.json()
        # What /likelihood says about the kept rows: its per-pixel NLL under each class, summed over them.
        kept_log_likelihood = []
        for name in SERVER_CLASS_NAMES:
            scored = await client.post(
                "/likelihood",
                data={"model": "cond", "label": name, "per_pixel": "true"},
                files={"image": ("x.png", png_bytes(image), "image/png")},
            )
            per_pixel = torch.tensor(scored.json()["results"][0]["per_pixel_nll"], dtype=torch.float64)
            kept_log_likelihood.append(-per_pixel[:rows].sum())
    expected = torch.softmax(torch.stack(kept_log_likelihood), dim=0).tolist()
    for entry in body["images"]:
        probabilities = entry["class_probabilities"]
        assert list(probabilities) == SERVER_CLASS_NAMES
        assert list(probabilities.values()) == pytest.approx(expected, abs=1e-4)  # per_pixel_nll has 5 decimals
        assert entry["label_name"] == SERVER_CLASS_NAMES[entry["label"]]
        assert math.isclose(sum(probabilities.values()), 1.0, rel_tol=1e-9)


async def test_unlabelled_completion_matches_the_reference_sampler(serve, models):
    image = top(4)
    async with serve() as (_, client):
        body = (await complete(client, image, rows=5, n=3, seed=21)).json()
    reference = sample_naive(models["cond"], 3, seed=21, known=image[None], known_rows=5)
    got = torch.stack([png_tensor(entry["png"]) for entry in body["images"]])
    assert torch.equal(got, reference.images)
    assert [entry["label"] for entry in body["images"]] == reference.labels.tolist()
    for entry, log_probs in zip(body["images"], reference.class_log_probs):
        assert list(entry["class_probabilities"].values()) == pytest.approx(
            log_probs.exp().tolist(), abs=1e-6
        )  # float32 model


async def test_prior_mode_given_label_and_sample_carry_no_posterior(serve, models):
    image = top(5)
    async with serve() as (_, client):
        prior = (await complete(client, image, rows=4, n=4, seed=2, label_mode="prior")).json()
        labelled = (await complete(client, image, rows=4, n=2, seed=2, label="Sneaker")).json()
        sample = (await client.post("/sample", json={"model": "cond", "n": 4, "seed": 2})).json()
        streamed = await complete(client, image, rows=4, n=2, seed=2, stream="true")
        wrong = await complete(client, image, rows=4, label_mode="likely")
    reference = sample_naive(models["cond"], 4, seed=2, known=image[None], known_rows=4, label_mode="prior")
    assert [e["label"] for e in prior["images"]] == reference.labels.tolist()
    # The prior draw is the one /sample makes: the same labels for the same seed.
    assert [e["label"] for e in prior["images"]] == [e["label"] for e in sample["images"]]
    for body in (prior, labelled, sample):
        assert all("class_probabilities" not in entry for entry in body["images"])
    done = [data for event, data in sse_events(streamed.text) if event == "done"][0]
    assert all(set(entry["class_probabilities"]) == set(SERVER_CLASS_NAMES) for entry in done["images"])
    assert wrong.status_code == 400
    error = wrong.json()["error"]
    assert error["field"] == "label_mode" and "'posterior' or 'prior'" in error["message"], error
