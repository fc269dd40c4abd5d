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
