"""Evaluation of a trained method on image-addition lists: MAE, exact-match rate, digit accuracy.

Every image of a split goes through the extractor exactly once; the lists then gather the softmax
outputs of their images. In eval mode the extractor maps each image to the same output wherever it
appears, so this gives the same predictions as running every list through the extractor, while a
k=100 test set costs one pass over the 10,000 test images instead of 100 images per list.
"""

import torch

from estinet.data import ImageSplit, ListSet
from estinet.methods import Method

EVAL_BATCH_IMAGES = 4096  # images per extractor forward pass during evaluation


@torch.inference_mode()
def split_probabilities(method: Method, split: ImageSplit, batch_images: int = EVAL_BATCH_IMAGES):
    """Softmax outputs (N, C) of the extractor for every image of the split, in eval mode."""
    was_training = method.extractor.training
    method.extractor.eval()
    chunks = [
        torch.softmax(method.extractor(split.images[start : start + batch_images]), dim=-1)
        for start in range(0, len(split), batch_images)
    ]
    method.extractor.train(was_training)
    return torch.cat(chunks)


def digit_accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images whose argmax class equals the digit label (diagnostics only)."""
    return float((probabilities.argmax(-1) == labels).float().mean())


@torch.inference_mode()
def evaluate_lists(
    method: Method, probabilities: torch.Tensor, lists: ListSet, batch_lists: int = 1000
) -> dict[str, float]:
    """MAE and exact-match rate of the method's test-time prediction over the lists.

    `probabilities` are split_probabilities() of the split the lists index. Exact match counts
    lists whose prediction rounded to the nearest integer equals the target sum. Prefixed entries
    (e.g. `estimator_mae`) come from Method.extra_predictions.
    """
    was_training = {name: module.training for name, module in method.modules().items()}
    for module in method.modules().values():
        module.eval()

    totals: dict[str, list[float]] = {}
    for start in range(0, len(lists), batch_lists):
        rows = lists.indices[start : start + batch_lists]  # (L, k)
        targets = lists.sums[start : start + batch_lists].float()  # (L,)
        list_probabilities = probabilities[rows]  # (L, k, C)
        predictions = {"": method.predict_from_probabilities(list_probabilities)}
        for prefix, values in method.extra_predictions(list_probabilities).items():
            predictions[prefix + "_"] = values
        for prefix, values in predictions.items():
            error = (values.float() - targets).abs()
            exact = (values.float().round() == targets).float()
            sums = totals.setdefault(prefix, [0.0, 0.0])
            sums[0] += float(error.sum())
            sums[1] += float(exact.sum())

    for name, module in method.modules().items():
        module.train(was_training[name])

    results = {}
    for prefix, (error_sum, exact_sum) in totals.items():
        results[f"{prefix}mae"] = error_sum / len(lists)
        results[f"{prefix}exact"] = exact_sum / len(lists)
    return results


def standard_error_of_mae(method: Method, probabilities: torch.Tensor, lists: ListSet) -> float:
    """Standard error of the mean absolute error over the lists (sample std / sqrt(L))."""
    with torch.inference_mode():
        predictions = method.predict_from_probabilities(probabilities[lists.indices]).float()
        errors = (predictions - lists.sums.float()).abs()
    if len(errors) < 2:
        return float("nan")
    return float(errors.std() / len(errors) ** 0.5)
