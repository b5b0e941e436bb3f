"""CA / ASR / ASR-all / RA against hand-computed cases."""

import pytest
import torch

from kdguard.metrics import backdoor_metrics, evaluate_backdoor


def test_all_to_one_hand_computed():
    # 6 test images, target class 0. Labels: two of class 0, four others.
    labels = torch.tensor([0, 0, 1, 2, 3, 1])
    clean_pred = torch.tensor([0, 1, 1, 2, 0, 1])      # 4 of 6 correct → CA 4/6
    bd_pred = torch.tensor([0, 0, 0, 2, 0, 1])         # on triggered copies
    target = torch.zeros(6, dtype=torch.long)
    non_target = labels != 0                           # 4 images count for ASR/RA
    m = backdoor_metrics(labels, clean_pred, bd_pred, target, non_target)
    assert m.ca == pytest.approx(4 / 6)
    # non-target images: idx 2 (→0 hit), 3 (→2 no), 4 (→0 hit), 5 (→1 no): ASR 2/4
    assert m.asr == pytest.approx(2 / 4)
    # all images: hits at idx 0,1,2,4 → 4/6
    assert m.asr_all == pytest.approx(4 / 6)
    # RA: non-target images still predicted as their label: idx 3 and 5 → 2/4
    assert m.ra == pytest.approx(2 / 4)
    assert (m.n_clean, m.n_backdoor, m.n_backdoor_all) == (6, 4, 6)
    assert (m.clean_correct, m.backdoor_hits, m.backdoor_hits_all, m.robust_correct) == (4, 2, 4, 2)
    # without the trigger, non-target images predicted as the target: idx 4 (3 → 0) → 1/4
    assert m.asr_no_trigger == pytest.approx(1 / 4) and m.no_trigger_hits == 1
    # the target class's own images (idx 0, 1), clean: idx 0 correct → target-class CA 1/2
    assert m.target_ca == pytest.approx(1 / 2) and (m.n_target, m.target_correct) == (2, 1)


def test_a_model_that_never_predicts_the_target_has_zero_asr_and_zero_target_ca():
    labels = torch.tensor([0, 0, 1, 2])
    never = torch.tensor([1, 2, 1, 2])  # class 0 is never predicted, with or without a trigger
    m = backdoor_metrics(labels, never, never, torch.zeros(4, dtype=torch.long), labels != 0)
    assert m.asr == 0.0 and m.ca == 0.5 and m.target_ca == 0.0


def test_all_to_all_targets_never_equal_labels():
    labels = torch.tensor([0, 1, 2, 2])
    target = (labels + 1) % 3
    bd_pred = torch.tensor([1, 2, 2, 0])
    m = backdoor_metrics(labels, labels.clone(), bd_pred, target, torch.ones(4, dtype=torch.bool))
    assert m.ca == 1.0 and m.asr_no_trigger == 0.0  # correct clean predictions never hit y + 1
    assert m.asr == pytest.approx(3 / 4) and m.asr_all == pytest.approx(3 / 4)
    assert m.ra == pytest.approx(1 / 4)
    assert m.target_ca is None and m.n_target == 0  # all-to-all: no image is a target-class image


def test_no_attack_gives_ca_only():
    m = backdoor_metrics(torch.tensor([1, 2]), torch.tensor([1, 0]))
    assert m.ca == 0.5 and m.asr is None and m.ra is None and m.n_backdoor == 0
    assert m.asr_no_trigger is None


def test_empty_non_target_set_gives_none_not_zero_division():
    labels = torch.zeros(3, dtype=torch.long)
    m = backdoor_metrics(labels, labels, labels, labels, labels != 0)
    assert m.asr is None and m.ra is None and m.asr_all == 1.0


def test_evaluate_backdoor_one_pass_with_trigger(tiny_net, blobs):
    # A trigger that blanks the image: predictions on triggered images are all the same class.
    def trigger(x):
        return torch.zeros_like(x)

    target = torch.zeros(len(blobs), dtype=torch.long)
    m = evaluate_backdoor(tiny_net, blobs.images, blobs.labels, trigger=trigger,
                          backdoor_target=target, non_target=blobs.labels != 0, batch_size=7)
    tiny_net.eval()
    with torch.no_grad():
        const = tiny_net(torch.zeros(1, 1, 12, 12)).argmax(1).item()
        clean = tiny_net(blobs.images.float() / 255).argmax(1)
    assert m.ca == pytest.approx((clean == blobs.labels).float().mean().item())
    assert m.asr == (1.0 if const == 0 else 0.0)
    assert m.n_backdoor == int((blobs.labels != 0).sum())
