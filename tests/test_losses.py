"""Losses: Hungarian matcher, DINO criterion (matched, aux, enc, dn), saliency targets/loss, SR loss.

Outputs are synthetic dicts with exactly the keys/shapes of docs/architecture.md ("Model -> criterion").
"""
import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdconet.config import LossConfig, SaliencyConfig, load_config
from sdconet.losses import HungarianMatcher, SetCriterion, saliency_loss, saliency_targets, sr_l1_loss
from sdconet.ops.box_ops import box_xyxy_to_cxcywh
from sdconet.utils.image import normalize

NUM_CLASSES = 6  # tiny preset


def make_target(boxes_xyxy_px, labels, size=(64, 64), ignore=None, image_id=0):
    """Target dict of the data contract from HR-pixel xyxy boxes."""
    height, width = size
    xyxy = torch.tensor(boxes_xyxy_px, dtype=torch.float32).view(-1, 4)
    boxes = box_xyxy_to_cxcywh(xyxy / torch.tensor([width, height, width, height]))
    n = len(boxes)
    return {"boxes": boxes, "boxes_xyxy": xyxy, "labels": torch.tensor(labels, dtype=torch.int64).view(n),
            "ignore": torch.zeros(n, dtype=torch.bool) if ignore is None else torch.tensor(ignore),
            "image_id": image_id, "size": size, "orig_size": size}


def random_boxes(*shape):
    centers = torch.rand(*shape, 2) * 0.6 + 0.2
    sizes = torch.rand(*shape, 2) * 0.3 + 0.05
    return torch.cat((centers, sizes), dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# matcher
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_queries,num_targets", [(5, 1), (5, 3), (6, 4), (3, 4)])
def test_matcher_equals_brute_force(num_queries, num_targets):
    matcher = HungarianMatcher()
    for trial in range(5):
        logits = torch.randn(1, num_queries, NUM_CLASSES) * 2
        boxes = random_boxes(1, num_queries)
        target = {"boxes": random_boxes(num_targets), "labels": torch.randint(0, NUM_CLASSES, (num_targets,))}
        (query_idx, target_idx), = matcher({"pred_logits": logits, "pred_boxes": boxes}, [target])
        cost = matcher.cost_matrix(logits[0], boxes[0], target["labels"], target["boxes"])
        # exhaustive search over every injective assignment of the smaller side into the larger one
        if num_queries >= num_targets:
            candidates = [{(q, t) for t, q in enumerate(perm)}
                          for perm in itertools.permutations(range(num_queries), num_targets)]
        else:
            candidates = [{(q, t) for q, t in enumerate(perm)}
                          for perm in itertools.permutations(range(num_targets), num_queries)]
        best = min(candidates, key=lambda pairs: sum(cost[q, t].item() for q, t in pairs))
        assert set(zip(query_idx.tolist(), target_idx.tolist())) == best, f"trial {trial}"


def test_matcher_cost_terms_by_hand():
    matcher = HungarianMatcher(class_cost=2.0, l1_cost=5.0, giou_cost=2.0)
    logit = 0.3
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])  # xyxy (0.4, 0.4, 0.6, 0.6)
    target_box = torch.tensor([[0.6, 0.5, 0.2, 0.2]])  # xyxy (0.5, 0.4, 0.7, 0.6)
    logits = torch.full((1, NUM_CLASSES), -5.0)
    logits[0, 2] = logit
    cost = matcher.cost_matrix(logits, box, torch.tensor([2]), target_box)
    p = 1 / (1 + math.exp(-logit))
    class_cost = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p ** 2 * -math.log(1 - p + 1e-8)
    l1 = 0.1
    iou = 0.02 / 0.06  # intersection 0.1 x 0.2, union 0.04 + 0.04 - 0.02; hull 0.3 x 0.2 = union -> giou = iou
    expected = 2 * class_cost + 5 * l1 - 2 * iou
    assert cost.item() == pytest.approx(expected, abs=1e-5)


def test_matcher_skips_ignored_and_empty_targets():
    matcher = HungarianMatcher()
    outputs = {"pred_logits": torch.randn(3, 8, NUM_CLASSES), "pred_boxes": random_boxes(3, 8)}
    targets = [
        make_target([[0, 0, 10, 10], [20, 20, 40, 40], [5, 30, 25, 60]], [0, 1, 2], ignore=[True, False, False]),
        make_target([], []),
        make_target([[0, 0, 10, 10]], [3], ignore=[True]),
    ]
    (q0, t0), (q1, t1), (q2, t2) = matcher(outputs, targets)
    assert sorted(t0.tolist()) == [1, 2]  # indices into the full list; the ignored box 0 is never matched
    assert len(set(q0.tolist())) == 2
    assert q1.numel() == t1.numel() == 0 and q2.numel() == t2.numel() == 0


def test_matcher_survives_non_finite_predictions():
    boxes = random_boxes(1, 4)
    boxes[0, 1] = float("nan")
    (query_idx, target_idx), = HungarianMatcher()(
        {"pred_logits": torch.randn(1, 4, NUM_CLASSES), "pred_boxes": boxes},
        [make_target([[0, 0, 10, 10]], [1])])
    assert target_idx.tolist() == [0] and query_idx.tolist() != [1]


# ----------------------------------------------------------------------------------------------------------------------
# criterion
# ----------------------------------------------------------------------------------------------------------------------
def perfect_case(num_queries=10):
    """2 images (2 + 1 targets); queries 3, 7 (image 0) and 5 (image 1) predict them exactly, with +10 logits."""
    targets = [make_target([[4, 4, 20, 28], [30, 10, 60, 40]], [1, 4], image_id=1),
               make_target([[10, 12, 50, 44]], [2], image_id=2)]
    logits = torch.full((2, num_queries, NUM_CLASSES), -10.0)
    boxes = random_boxes(2, num_queries)
    for b, queries in enumerate(([3, 7], [5])):
        for j, q in enumerate(queries):
            boxes[b, q] = targets[b]["boxes"][j]
            logits[b, q, targets[b]["labels"][j]] = 10.0
    return {"pred_logits": logits, "pred_boxes": boxes}, targets, {0: [3, 7], 1: [5]}


def with_aux_and_enc(output):
    copy = lambda: {k: v.clone() for k, v in output.items()}  # noqa: E731
    return {**copy(), "aux_outputs": [copy()], "enc_outputs": copy()}


def test_criterion_perfect_prediction_beats_perturbed():
    cfg = load_config("tiny")
    criterion = SetCriterion.from_config(cfg)
    output, targets, matched = perfect_case()
    perfect = criterion(with_aux_and_enc(output), targets)
    for suffix in ("", "_aux0", "_enc"):
        assert perfect[f"loss_l1{suffix}"].item() == pytest.approx(0.0, abs=1e-6)
        assert perfect[f"loss_giou{suffix}"].item() == pytest.approx(0.0, abs=1e-5)
        assert perfect[f"loss_class{suffix}"].item() < 1e-3
    assert perfect["loss"].item() == pytest.approx(sum(v.item() for k, v in perfect.items() if k != "loss"))

    shifted = {k: v.clone() for k, v in output.items()}
    for b, queries in matched.items():
        shifted["pred_boxes"][b, queries, 0] += 0.05
    perturbed = criterion(with_aux_and_enc(shifted), targets)
    # 3 matched boxes, each |dcx| = 0.05, summed / num_boxes 3, times l1 weight 5
    assert perturbed["loss_l1"].item() == pytest.approx(5 * 3 * 0.05 / 3, rel=1e-5)
    assert perturbed["loss_giou"].item() > 0.05
    assert perturbed["loss"].item() > perfect["loss"].item() + 1.0


def dn_case():
    """Perfect dn outputs for perfect_case's targets: max_gt 2, 2 groups -> single_pad 4, pad_size 8."""
    _, targets, _ = perfect_case()
    num_groups, max_gt = 2, 2
    single_pad = 2 * max_gt
    logits = torch.full((2, num_groups * single_pad, NUM_CLASSES), -10.0)
    boxes = random_boxes(2, num_groups * single_pad)
    for b, target in enumerate(targets):
        for g in range(num_groups):
            for j in range(len(target["labels"])):
                boxes[b, g * single_pad + j] = target["boxes"][j]
                logits[b, g * single_pad + j, target["labels"][j]] = 10.0
    meta = {"num_groups": num_groups, "single_pad": single_pad, "pad_size": num_groups * single_pad}
    return {"pred_logits": logits, "pred_boxes": boxes}, meta, targets


def test_criterion_denoising_indexing():
    criterion = SetCriterion(LossConfig())
    matched_output, targets, _ = perfect_case()
    dn_output, dn_meta, _ = dn_case()

    def run(dn_last):
        outputs = {**matched_output, "dn_outputs": [dn_output, dn_last], "dn_meta": dn_meta}
        return criterion(outputs, targets)

    clone = lambda: {k: v.clone() for k, v in dn_output.items()}  # noqa: E731
    base = run(clone())
    for suffix in ("_dn", "_dn_aux0"):
        assert base[f"loss_l1{suffix}"].item() == pytest.approx(0.0, abs=1e-6)
        assert base[f"loss_giou{suffix}"].item() == pytest.approx(0.0, abs=1e-5)
        assert base[f"loss_class{suffix}"].item() < 1e-3

    # a positive (group 1, target 0 of image 0 -> query 4) moved by 0.1: L1 = 5 * 0.1 / (num_boxes 3 * groups 2)
    moved = clone()
    moved["pred_boxes"][0, 4, 1] += 0.1
    assert run(moved)["loss_l1_dn"].item() == pytest.approx(5 * 0.1 / 6, rel=1e-5)

    # a negative (group 0, target 1 of image 0 -> query 3) gets background only: box irrelevant, logits matter
    negative = clone()
    negative["pred_boxes"][0, 3] = torch.tensor([0.9, 0.9, 0.1, 0.1])
    assert run(negative)["loss_l1_dn"].item() == pytest.approx(0.0, abs=1e-6)
    negative["pred_logits"][0, 3, 0] = 10.0
    assert run(negative)["loss_class_dn"].item() > base["loss_class_dn"].item() + 1.0

    # image 1 has 1 target: its slots j=1 (queries 1, 5) and negatives j=1 (queries 3, 7) are padding -> no loss
    padding = clone()
    padding["pred_boxes"][1, [1, 3, 5, 7]] = torch.tensor([0.9, 0.9, 0.1, 0.1])
    padding["pred_logits"][1, [1, 3, 5, 7]] = 10.0
    out = run(padding)
    for key in ("loss_class_dn", "loss_l1_dn", "loss_giou_dn"):
        assert out[key].item() == pytest.approx(base[key].item(), abs=1e-7)
    # ...while image 1's real negative (query 2) does count
    padding["pred_logits"][1, 2] = 10.0
    assert run(padding)["loss_class_dn"].item() > base["loss_class_dn"].item() + 1.0


def test_criterion_rejects_inconsistent_dn_meta():
    matched_output, targets, _ = perfect_case()
    dn_output, dn_meta, _ = dn_case()
    with pytest.raises(ValueError, match="max_gt"):
        SetCriterion(LossConfig())({**matched_output, "dn_outputs": [dn_output],
                                    "dn_meta": {"num_groups": 4, "single_pad": 2, "pad_size": 8}}, targets)
    with pytest.raises(ValueError, match="dn_meta"):
        SetCriterion(LossConfig())({**matched_output, "dn_outputs": [dn_output], "dn_meta": None}, targets)


def test_criterion_ignored_targets():
    criterion = SetCriterion(LossConfig())
    # target 0 kept, target 1 ignored (difficult)
    targets = [make_target([[4, 4, 20, 20], [36, 36, 60, 60]], [1, 2], ignore=[False, True])]
    logits = torch.full((1, 6, NUM_CLASSES), -10.0)
    boxes = torch.tensor([[[0.8, 0.2, 0.1, 0.1]] * 6])
    boxes[0, 0] = targets[0]["boxes"][0]
    logits[0, 0, 1] = 10.0
    boxes[0, 1] = targets[0]["boxes"][1]  # query 1 sits on the ignored box
    base = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert base["loss_l1"].item() == pytest.approx(0.0, abs=1e-6)  # the ignored box is not matched to query 1

    confident = logits.clone()
    confident[0, 1, 2] = 10.0  # detecting the difficult object is not punished...
    out = criterion({"pred_logits": confident, "pred_boxes": boxes}, targets)
    assert out["loss_class"].item() == pytest.approx(base["loss_class"].item(), abs=1e-7)
    confident[0, 2, 2] = 10.0  # ...but a confident query elsewhere is a false positive
    out = criterion({"pred_logits": confident, "pred_boxes": boxes}, targets)
    assert out["loss_class"].item() > base["loss_class"].item() + 1.0

    # num_boxes counts only the kept target: moving query 0 by 0.1 gives 5 * 0.1 / 1
    moved = boxes.clone()
    moved[0, 0, 0] += 0.1
    assert criterion({"pred_logits": logits, "pred_boxes": moved}, targets)["loss_l1"].item() == pytest.approx(
        0.5, rel=1e-5)

    # with the threshold above 1 the overlapping query is trained as background again
    strict = SetCriterion(LossConfig(ignore_iou_threshold=1.1))
    confident = logits.clone()
    confident[0, 1, 2] = 10.0
    assert strict({"pred_logits": confident, "pred_boxes": boxes}, targets)["loss_class"].item() > \
        strict({"pred_logits": logits, "pred_boxes": boxes}, targets)["loss_class"].item() + 1.0


def test_criterion_rejects_labels_beyond_the_model_classes():
    output, targets, _ = perfect_case()
    targets[1]["labels"] = torch.tensor([NUM_CLASSES])
    with pytest.raises(ValueError, match="num_classes"):
        SetCriterion(LossConfig())(output, targets)


def test_criterion_without_targets_still_has_gradients():
    criterion = SetCriterion(LossConfig())
    logits = torch.randn(2, 5, NUM_CLASSES, requires_grad=True)
    boxes = random_boxes(2, 5).requires_grad_(True)
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, [make_target([], []), make_target([], [])])
    assert losses["loss_l1"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert logits.grad.abs().sum() > 0


def _ddp_worker(rank, world_size, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        output, targets, matched = perfect_case()
        output["pred_boxes"][0, 3, 0] += 0.05  # one box off by 0.05 on every rank
        if rank == 1:  # rank 1 keeps only image 0 (2 targets): mean num_boxes = (3 + 2) / 2
            output = {k: v[:1] for k, v in output.items()}
            targets = targets[:1]
        l1 = SetCriterion(LossConfig())(output, targets)["loss_l1"].item()
        torch.save(torch.tensor(l1), f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_num_boxes_averaged_across_ddp_ranks(tmp_path):
    # forkserver, not fork: forking a process whose torch thread pools are running can deadlock the children;
    # preloading makes the server import torch once for both workers
    mp.get_context("forkserver").set_forkserver_preload(["torch", "sdconet.losses"])
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "l1")), nprocs=2, join=True,
                       start_method="forkserver")
    for rank in range(2):
        l1 = torch.load(tmp_path / f"l1.{rank}").item()
        assert l1 == pytest.approx(5 * 0.05 / 2.5, rel=1e-5), f"rank {rank}"


# ----------------------------------------------------------------------------------------------------------------------
# saliency targets
# ----------------------------------------------------------------------------------------------------------------------
ONE_LEVEL = SaliencyConfig(level_ranges=((-1.0, 64.0),))


def one_level_values(target, cfg=ONE_LEVEL):
    """64x64 HR image, one 8x8 level: token (i, j) has its centre at (8j + 4, 8i + 4) HR px."""
    values, ignored = saliency_targets([target], torch.tensor([[8, 8]]), torch.ones(1, 1, 2), cfg)
    return values[0].view(8, 8), ignored[0].view(8, 8)


def test_saliency_values_centre_inside_edge_outside():
    values, ignored = one_level_values(make_target([[0, 0, 24, 24]], [0]))
    assert values[1, 1].item() == pytest.approx(1.0)  # centre (12, 12) = box centre
    assert values[1, 0].item() == pytest.approx(math.exp(-8 / 9))  # (4, 12): dx = (4 - 20) / 24 = -2/3
    assert values[0, 0].item() == pytest.approx(math.exp(-16 / 9))  # (4, 4): dx = dy = -2/3
    assert values[3:, :].abs().sum() == 0 and values[:, 3:].abs().sum() == 0  # centres >= 28 are outside
    assert not ignored.any()

    # a token exactly on a side is not inside (strict); one 0.5 px inside gets exp(-dx^2 / (2 sigma^2)), dx -> -1
    values, _ = one_level_values(make_target([[4, 0, 60, 24], [3.5, 32, 60.5, 56]], [0, 0]))
    assert values[1, 0].item() == 0.0
    dx = (0.5 - 56.5) / 57.0
    dy = (12 - 12) / 24
    assert values[5, 0].item() == pytest.approx(math.exp(-(dx ** 2 + dy ** 2) / (2 * 0.5 ** 2)), rel=1e-5)
    assert values[5, 0].item() == pytest.approx(math.exp(-2), rel=0.1)  # the limit at a side is exp(-2)


def test_saliency_linear_vs_gaussian():
    target = make_target([[0, 0, 24, 24]], [0])
    linear, _ = one_level_values(target, SaliencyConfig(level_ranges=((-1.0, 64.0),), target_mode="linear"))
    gaussian, _ = one_level_values(target, SaliencyConfig(level_ranges=((-1.0, 64.0),), sigma=1.0))
    assert linear[1, 1].item() == pytest.approx(1.0)
    assert linear[1, 0].item() == pytest.approx(1 - 0.5 * 2 / 3)
    assert linear[0, 0].item() == pytest.approx(1 - 0.5 * math.sqrt(8 / 9))
    assert gaussian[1, 0].item() == pytest.approx(math.exp(-(4 / 9) / 2))  # sigma 1
    with pytest.raises(ValueError, match="target_mode"):
        one_level_values(target, SaliencyConfig(level_ranges=((-1.0, 64.0),), target_mode="box"))


def test_saliency_level_assignment_by_box_size():
    # 512x512 HR, 4 levels of 32/16/8/4 tokens (HR strides 16/32/64/128; centres 8+16k, 16+32k, 32+64k, 64+128k)
    shapes = torch.tensor([[32, 32], [16, 16], [8, 8], [4, 4]])
    cfg = SaliencyConfig()  # (-1, 64], (64, 128], (128, 256], (256, inf)

    def levels_of(box_xyxy):
        values, _ = saliency_targets([make_target([box_xyxy], [0], size=(512, 512))], shapes,
                                     torch.ones(1, 4, 2), cfg)
        return [v.view(int(s[0]), int(s[1])) for v, s in zip(values, shapes)]

    small = levels_of([244, 244, 284, 284])  # 40 px, centred on level-0 token (16, 16): max side 20
    assert small[0][16, 16].item() == pytest.approx(1.0)
    assert all(level.sum() == 0 for level in small[1:])  # no token of a 40 px box has max side > 64
    medium = levels_of([172, 172, 372, 372])  # 200 px, centred on level-1 token (8, 8): max side 100
    assert medium[1][8, 8].item() == pytest.approx(1.0)
    assert medium[0].sum() == 0  # every inside token has max side >= 100 > 64
    large = levels_of([88, 88, 488, 488])  # 400 px, centred on level-2 token (4, 4): max side 200
    assert large[2][4, 4].item() == pytest.approx(1.0)
    assert large[0].sum() == 0 and large[1].sum() == 0
    # ranges are (lo, hi]: max side exactly 64 belongs to level 0, not to level 1
    assert levels_of([200, 200, 328, 328])[0][16, 16].item() == pytest.approx(1.0)  # centre 264, max side 64
    assert levels_of([208, 208, 336, 336])[1][8, 8].item() == 0.0  # centre 272, max side 64
    huge = levels_of([0, 0, 512, 512])  # 512 px: centre token max side ~256-320
    assert huge[3].max() > 0 and huge[0].sum() == 0


def brute_force_saliency(targets, shapes, valid_ratios, cfg):
    """Per-token Python loop straight from the definition (reference for the vectorised code)."""
    levels = []
    for level, ((height, width), (lo, hi)) in enumerate(zip(shapes.tolist(), cfg.level_ranges)):
        out = torch.zeros(len(targets), height * width)
        for b, target in enumerate(targets):
            img_h, img_w = target["size"]
            ratio_w, ratio_h = valid_ratios[b, level].tolist()
            for i in range(height):
                for j in range(width):
                    x = (j + 0.5) / (width * ratio_w) * img_w
                    y = (i + 0.5) / (height * ratio_h) * img_h
                    best = 0.0
                    for (x1, y1, x2, y2), ignore in zip(target["boxes_xyxy"].tolist(), target["ignore"].tolist()):
                        l, t, r, bt = x - x1, y - y1, x2 - x, y2 - y
                        if ignore or min(l, t, r, bt) <= 0 or not lo < max(l, t, r, bt) <= hi:
                            continue
                        dx, dy = (l - r) / (l + r), (t - bt) / (t + bt)
                        if cfg.target_mode == "gaussian":
                            value = math.exp(-(dx * dx + dy * dy) / (2 * cfg.sigma ** 2))
                        else:
                            value = 1 - 0.5 * math.sqrt(dx * dx + dy * dy)
                        best = max(best, value)
                    out[b, i * width + j] = best
        levels.append(out)
    return levels


@pytest.mark.parametrize("mode", ["gaussian", "linear"])
def test_saliency_matches_brute_force_with_padding(mode):
    # image 0: 128x96 HR (H x W), image 1: 96x128, padded batch 128x128 -> per-level valid ratios
    gen = torch.Generator().manual_seed(3)
    shapes = torch.tensor([[16, 16], [8, 8], [4, 4], [2, 2]])
    cfg = SaliencyConfig(level_ranges=((-1.0, 16.0), (16.0, 32.0), (32.0, 64.0), (64.0, math.inf)),
                         target_mode=mode, sigma=0.7)
    targets = []
    for image_id, (height, width) in enumerate([(128, 96), (96, 128)]):
        n = 12
        x1 = torch.rand(n, generator=gen) * width * 0.6
        y1 = torch.rand(n, generator=gen) * height * 0.6
        w = torch.rand(n, generator=gen) ** 2 * 90 + 4  # mostly small, some up to ~94 px
        h = torch.rand(n, generator=gen) ** 2 * 90 + 4
        boxes = torch.stack((x1, y1, (x1 + w).clamp(max=width), (y1 + h).clamp(max=height)), dim=1)
        boxes = torch.cat((boxes, torch.tensor([[1.0, 1.0, width - 1.0, height - 1.0]])))  # reaches the last range
        targets.append(make_target(boxes.tolist(), [0] * (n + 1), size=(height, width),
                                   ignore=[False] * (n - 1) + [True, False], image_id=image_id))
    valid_ratios = torch.tensor([[[96 / 128, 1.0]] * 4, [[1.0, 96 / 128]] * 4])
    values, ignored = saliency_targets(targets, shapes, valid_ratios, cfg)
    expected = brute_force_saliency(targets, shapes, valid_ratios, cfg)
    for level, (got, want) in enumerate(zip(values, expected)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"level {level}")
    positives_per_level = [int((v > 0).sum()) for v in values]
    assert all(count > 0 for count in positives_per_level), positives_per_level  # every level is exercised
    assert any(bool(i.any()) for i in ignored)


def test_saliency_ignored_boxes_are_left_out():
    values, ignored = one_level_values(make_target([[0, 0, 24, 24], [32, 32, 56, 56]], [0, 1],
                                                   ignore=[False, True]))
    assert values[1, 1].item() == pytest.approx(1.0)
    assert values[4:, 4:].sum() == 0  # the ignored box makes no positives...
    assert ignored[5, 5] and ignored[4, 4] and not ignored[1, 1] and not ignored[0, 7]  # ...and is skipped


def test_saliency_loss_masks_and_normalisation():
    target = make_target([[0, 0, 24, 24], [32, 32, 56, 56]], [0, 1], ignore=[False, True])
    values, ignored = saliency_targets([target], torch.tensor([[8, 8]]), torch.ones(1, 1, 2), ONE_LEVEL)
    padding = torch.zeros(1, 64, dtype=torch.bool)
    padding[0, 56:] = True  # last row of tokens is padding
    logits = torch.randn(1, 64)
    loss = saliency_loss([logits], values, ignored, [padding])
    changed = logits.clone()
    changed[0, 56:] = 20.0  # padding tokens
    changed[0, 5 * 8 + 5] = 20.0  # a token inside the ignored box
    assert saliency_loss([changed], values, ignored, [padding]).item() == pytest.approx(loss.item(), rel=1e-6)
    changed[0, 7] = 20.0  # a valid background token
    assert saliency_loss([changed], values, ignored, [padding]).item() > loss.item()
    # normaliser = positives (9 tokens inside the kept box) unless given
    assert int((values[0] > 0).sum()) == 9
    assert saliency_loss([logits], values, ignored, [padding], num_positives=18).item() == pytest.approx(
        loss.item() / 2, rel=1e-6)
    # logits that follow the targets give a lower loss than uninformed ones
    informed = torch.logit(values[0].clamp(1e-3, 1 - 1e-3))
    assert saliency_loss([informed], values, ignored, [padding]) < saliency_loss([torch.zeros(1, 64)], values,
                                                                                  ignored, [padding])


def test_criterion_includes_saliency_and_sr():
    cfg = load_config("tiny")
    criterion = SetCriterion.from_config(cfg)
    output, targets, _ = perfect_case()
    shapes = torch.tensor([[8, 8], [4, 4], [2, 2], [1, 1]])
    saliency = {"saliency_logits": [torch.zeros(2, int(h * w)) for h, w in shapes.tolist()],
                "spatial_shapes": shapes, "valid_ratios": torch.ones(2, 4, 2),
                "level_masks": [torch.zeros(2, int(h * w), dtype=torch.bool) for h, w in shapes.tolist()]}
    images_hr = torch.rand(2, 3, 64, 64)
    sr_image = normalize(images_hr) + 0.1
    losses = criterion({**output, **saliency, "sr_image": sr_image}, targets, images_hr=images_hr)
    assert losses["loss_sr"].item() == pytest.approx(cfg.loss.sr_weight * 0.1, rel=1e-4)
    values, ignored = saliency_targets(targets, shapes, saliency["valid_ratios"], cfg.model.saliency)
    expected = cfg.loss.saliency_weight * saliency_loss(saliency["saliency_logits"], values, ignored)
    assert losses["loss_saliency"].item() == pytest.approx(expected.item(), rel=1e-6) and expected > 0
    assert losses["loss"].item() == pytest.approx(sum(v.item() for k, v in losses.items() if k != "loss"),
                                                  rel=1e-6)
    with pytest.raises(ValueError, match="images_hr"):
        criterion({**output, "sr_image": sr_image}, targets)
    assert "loss_saliency" not in criterion(output, targets) and "loss_sr" not in criterion(output, targets)


# ----------------------------------------------------------------------------------------------------------------------
# SR loss
# ----------------------------------------------------------------------------------------------------------------------
def test_sr_loss_masks_padding():
    images_hr = torch.rand(2, 3, 16, 16)
    sr_image = normalize(images_hr) + 0.25
    masks_hr = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks_hr[1, 10:, :] = True
    sr_image[1, :, 10:, :] = 100.0  # garbage in the padding must not count
    assert sr_l1_loss(sr_image, images_hr, masks_hr).item() == pytest.approx(0.25, rel=1e-5)
    assert sr_l1_loss(sr_image, images_hr).item() > 10
    with pytest.raises(ValueError, match="HR size"):
        sr_l1_loss(sr_image[:, :, :8], images_hr)
