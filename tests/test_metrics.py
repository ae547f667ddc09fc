"""fitkit.metrics: Accuracy, Mean, function and torchmetrics-like metrics, state, errors."""

from __future__ import annotations

import math

import pytest
import torch

from fitkit.metrics import Accuracy, Mean, Metric, get_metric

# Four samples, three classes; no ties. Per sample: top-1 class, classes ranked 1-2.
LOGITS = torch.tensor(
    [
        [0.1, 0.9, 0.0],  # top-1: 1, top-2: {1, 0}
        [0.8, 0.1, 0.05],  # top-1: 0, top-2: {0, 1}
        [0.2, 0.3, 0.5],  # top-1: 2, top-2: {2, 1}
        [0.3, 0.45, 0.25],
    ]
)  # top-1: 1, top-2: {1, 0}
TARGETS = torch.tensor([1, 0, 1, 2])  # top-1 right: samples 0, 1; top-2 right: 0, 1, 2


def computed(metric: Metric) -> float:
    return metric.compute().item()


# -- Accuracy ------------------------------------------------------------------------------------------
def test_top_1_accuracy():
    metric = Accuracy()
    metric.update(LOGITS, TARGETS)
    assert computed(metric) == 2 / 4
    assert metric.name == "accuracy"


def test_top_k_accuracy():
    metric = Accuracy(top_k=2)
    metric.update(LOGITS, TARGETS)
    assert computed(metric) == 3 / 4
    assert metric.name == "top2_accuracy"
    assert get_metric("top5_accuracy").top_k == 5


def test_one_hot_and_probability_targets_mean_their_argmax():
    metric = Accuracy()
    metric.update(LOGITS, torch.nn.functional.one_hot(TARGETS, 3).float())
    metric.update(LOGITS, torch.tensor([[0.1, 0.7, 0.2]] * 4))  # class 1 for all: samples 0 and 3 right
    assert computed(metric) == (2 + 2) / 8


def test_class_index_targets_of_shape_n_by_1():
    metric = Accuracy()
    metric.update(LOGITS, TARGETS.unsqueeze(1))  # Keras's sparse labels often come as (N, 1)
    assert computed(metric) == 2 / 4


@pytest.mark.parametrize("shape", [(5,), (5, 1)])
def test_binary_accuracy_thresholds_logits_at_0(shape):
    logits = torch.tensor([-2.0, -0.1, 0.3, 4.0, 0.0]).reshape(shape)
    targets = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0]).reshape(shape)  # 0.0 counts as negative: wrong
    metric = Accuracy()
    metric.update(logits, targets)
    assert computed(metric) == 3 / 5


def test_binary_accuracy_with_probabilities_and_threshold():
    metric = Accuracy(threshold=0.5)
    metric.update(torch.tensor([0.2, 0.6, 0.9, 0.4]), torch.tensor([0, 1, 0, 0]))
    assert computed(metric) == 3 / 4


def test_accuracy_is_weighted_by_samples_across_updates():
    metric = Accuracy()
    metric.update(LOGITS, TARGETS)  # 2 of 4
    metric.update(LOGITS[:2], TARGETS[:2])  # 2 of 2
    assert computed(metric) == 4 / 6  # not (0.5 + 1.0) / 2


def test_compute_without_updates_is_nan_and_reset_clears():
    metric = Accuracy()
    assert math.isnan(computed(metric))
    metric.update(LOGITS, TARGETS)
    metric.reset()
    assert math.isnan(computed(metric))
    metric.update(LOGITS[:1], TARGETS[:1])
    assert computed(metric) == 1.0


@pytest.mark.parametrize("top_k", [0, -1, 1.5, "1"])
def test_accuracy_top_k_must_be_a_positive_int(top_k):
    with pytest.raises(ValueError, match=rf"top_k must be an int >= 1, got {top_k!r}"):
        Accuracy(top_k=top_k)


def test_accuracy_rejects_shapes_it_cannot_read():
    with pytest.raises(
        ValueError,
        match=r"accuracy: expected outputs \(N, C\) and targets \(N,\), got \(2, 3, 5\) "
        r"and \(2, 5\)",
    ):
        Accuracy().update(torch.zeros(2, 3, 5), torch.zeros(2, 5, dtype=torch.long))


def test_accuracy_rejects_non_tensors():
    with pytest.raises(TypeError, match=r"accuracy: expected tensor outputs and targets, got float and Tensor"):
        Accuracy().update(3.0, TARGETS)


def test_accuracy_of_a_tuple_or_dict_output_names_output():
    with pytest.raises(
        TypeError,
        match=r"accuracy: the model returns a tuple of 1, not one tensor; pick the output this metric reads "
        r"with output=, e.g. Accuracy\(output=0\)",
    ):
        Accuracy().update((LOGITS,), TARGETS)
    with pytest.raises(TypeError, match=r"the model returns a dict with keys \['logits'\]"):
        Accuracy().update({"logits": LOGITS}, TARGETS)


@pytest.mark.parametrize("outputs, output", [((None, LOGITS), 1), ({"logits": LOGITS, "aux": None}, "logits")])
def test_output_picks_one_of_the_model_outputs(outputs, output):
    picked, plain = Accuracy(output=output), Accuracy()
    picked.update(outputs, TARGETS)
    plain.update(LOGITS, TARGETS)
    assert picked.compute().item() == plain.compute().item()


def test_output_that_picks_nothing_is_an_error():
    with pytest.raises(
        ValueError,
        match=r"metric 'accuracy': output='prob' does not pick anything from the model's "
        r"outputs \(a dict with keys \['logits'\]\)",
    ):
        Accuracy(output="prob").update({"logits": LOGITS}, TARGETS)


# -- Mean ------------------------------------------------------------------------------------------------
def test_mean_weights_scalars_by_their_weight():
    metric = Mean()
    metric.update(torch.tensor(2.0), 3)
    metric.update(torch.tensor(4.0), 1)
    assert computed(metric) == (2.0 * 3 + 4.0 * 1) / 4


def test_mean_of_per_sample_values_counts_each_sample():
    metric = Mean()
    metric.update(torch.tensor([1.0, 2.0, 3.0]))
    metric.update(torch.tensor(10.0))  # a scalar without weight counts once
    assert computed(metric) == (1 + 2 + 3 + 10) / 4


def test_mean_accumulates_in_float64():
    metric = Mean()
    for _ in range(1000):
        metric.update(torch.tensor(0.1, dtype=torch.float32), 1)
    assert metric.compute().dtype == torch.float64
    assert computed(metric) == pytest.approx(float(torch.tensor(0.1, dtype=torch.float32)), rel=1e-12)


# -- state ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [Accuracy, lambda: Accuracy(top_k=2)])
def test_state_dict_round_trip_continues_like_the_original(make):
    original = make()
    original.update(LOGITS, TARGETS)
    state = original.state_dict()
    assert all(v is None or isinstance(v, (int, torch.Tensor)) for v in state.values())
    restored = make()
    restored.load_state_dict(state, torch.device("cpu"))
    assert computed(restored) == computed(original)
    for metric in (original, restored):
        metric.update(LOGITS[2:], TARGETS[2:])
    assert computed(restored) == computed(original)


def test_sync_state_round_trip():
    original = Mean()
    original.update(torch.tensor([1.0, 5.0]))
    restored = Mean()
    restored.load_sync_state(original.sync_state())
    assert computed(restored) == 3.0
    assert [t.item() for t in Mean().sync_state()] == [0.0, 0.0]


def test_state_dict_of_an_empty_metric_round_trips():
    restored = Accuracy()
    restored.load_state_dict(Accuracy().state_dict())
    assert math.isnan(computed(restored))


# -- higher_is_better and get_metric ------------------------------------------------------------------------
class DuckMetric:
    """Update/compute/reset, like a torchmetrics.Metric."""

    def __init__(self, higher_is_better=None):
        if higher_is_better is not None:
            self.higher_is_better = higher_is_better
        self.reset()

    def update(self, outputs, targets):
        self.total += float((outputs - targets).abs().sum())
        self.count += len(targets)

    def compute(self):
        return torch.tensor(self.total / self.count)

    def reset(self):
        self.total, self.count = 0.0, 0


def max_error(outputs, targets):
    return (outputs - targets).abs().max()


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("accuracy", True),
        (Mean(), None),
        (max_error, None),
        (DuckMetric(higher_is_better=False), False),
        (DuckMetric(), None),
    ],
)
def test_higher_is_better(spec, expected):
    assert get_metric(spec).higher_is_better is expected


def test_get_metric_names_and_passthrough():
    metric = Accuracy(name="acc_top1")
    assert get_metric(metric) is metric
    assert type(get_metric("acc")) is Accuracy
    assert get_metric(max_error).name == "max_error"
    assert get_metric(DuckMetric()).name == "duck_metric"


def test_function_metric_is_a_sample_weighted_mean_of_batch_values():
    metric = get_metric(max_error)
    metric.update(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 1.0]))  # max error 2, 3 samples
    metric.update(torch.tensor([5.0]), torch.tensor([0.0]))  # max error 5, 1 sample
    assert computed(metric) == (2.0 * 3 + 5.0 * 1) / 4


def test_duck_typed_metric_delegates_to_the_object():
    duck = DuckMetric()
    metric = get_metric(duck)
    metric.update(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    assert computed(metric) == 1.5
    metric.reset()
    assert duck.count == 0


def test_unknown_metric_name_lists_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown metric 'f1'; known shortcuts: \['acc', 'accuracy', "
        r"'top5_accuracy'\]. Pass a fitkit.metrics.Metric",
    ):
        get_metric("f1")


def test_a_metric_that_is_nothing_usable_is_a_type_error():
    with pytest.raises(TypeError, match=r"cannot use 42 as a metric: expected a string, a fitkit.metrics.Metric"):
        get_metric(42)


def test_a_metric_function_must_return_a_0_dim_tensor():
    metric = get_metric(lambda outputs, targets: (outputs - targets).abs())
    with pytest.raises(
        TypeError,
        match=r"metric function '<lambda>' must return a 0-dim tensor \(the batch mean\), "
        r"got Tensor\(2,\)",
    ):
        metric.update(torch.ones(2), torch.zeros(2))
    with pytest.raises(TypeError, match=r"must return a 0-dim tensor \(the batch mean\), got float"):
        get_metric(lambda outputs, targets: 1.0).update(torch.ones(2), torch.zeros(2))


def test_the_base_metric_asks_for_batch_sum():
    with pytest.raises(NotImplementedError):
        Metric().update(torch.ones(1), torch.ones(1))


def test_accuracy_top_k_larger_than_the_classes_is_a_clear_error():
    with pytest.raises(ValueError, match="top_k=5 but the outputs have only 3 classes"):
        Accuracy(top_k=5).update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
