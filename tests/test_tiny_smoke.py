import pytest

from conftest import tiny_config


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("method", ["lora", "full", "head"])
def test_methods_train_on_each_family(family, method, tiny_model_dir, tmp_path):
    import lorafit

    cfg = tiny_config(tiny_model_dir(family), tmp_path, method=method, pooling="cls" if method != "head" else "mean",
                      max_train_samples=64, max_eval_samples=32, epochs=1)
    run = lorafit.train(cfg)
    assert (run.path / "model").is_dir()
    clf = lorafit.load(run.path)
    probs = clf.predict_proba(["Stocks fall as oil prices climb", "Federer wins the final"])
    assert probs.shape == (2, 4)
    assert abs(probs.sum(1) - 1).max() < 1e-5


def test_time_budget_stops_training_and_the_run_still_evaluates(tiny_model_dir, tmp_path):
    import lorafit

    # 0.01 s: spent before the first step ends, so exactly one step runs; the run still completes and evaluates
    run = lorafit.train(tiny_config(tiny_model_dir("bert"), tmp_path, epochs=50, time_budget_minutes=1 / 6000,
                                    lora_layers=[-1]))
    assert run.info["stop_reason"] == "time_budget" and run.info["steps"] == 1
    assert run.info["prefix_cache_from_layer"] == 1 and 0 <= run.test_metrics["accuracy"] <= 1
