import pytest
import torch
from torch import nn

from kd_optuna.train.engine import Hooks, eval_outputs, evaluate, make_optimizer, train_epochs, train_steps
from kd_optuna.train.schedule import lr_factor
from kd_optuna.errors import KdOptunaError, first_line


def test_make_optimizer_keeps_each_callers_nesterov_flag():
    params = [nn.Parameter(torch.zeros(2))]
    assert make_optimizer("sgd", params, lr=0.1, momentum=0.9, nesterov=True).defaults["nesterov"] is True
    assert make_optimizer("sgd", params, lr=0.1, momentum=0.9).defaults["nesterov"] is False
    assert isinstance(make_optimizer("adamw", params, lr=0.1), torch.optim.AdamW)
    with pytest.raises(KdOptunaError, match="optimizer"):
        make_optimizer("lion", params, lr=0.1)


def test_step_milestones_in_steps_when_an_epoch_is_one_step():
    assert [lr_factor("step", s, 10, 1, (2.5, 5), 0.5) for s in (2, 3, 5)] == [1.0, 0.5, 0.25]
    assert lr_factor("cosine", 10, 10) == pytest.approx(0.0)


def test_train_steps_calls_hooks_in_order_and_stops_at_max_steps():
    w = nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD([w], lr=1.0)
    calls, drawn = [], []

    def source():
        for i in range(5):
            drawn.append(i)
            yield i

    hooks = Hooks(after_loss=lambda s, _: calls.append(("loss", s)), after_backward=lambda s: calls.append(("back", s)),
                  after_step=lambda s, _, b: calls.append(("step", s, b)))
    end = train_steps(opt, source(), lambda b: w * b, lr=0.5, lr_at=lambda s: 1.0 / (s + 1), first_step=3,
                      max_steps=2, hooks=hooks)
    assert end == 5 and drawn == [0, 1, 2]
    assert calls == [("loss", 3), ("back", 3), ("step", 4, 0), ("loss", 4), ("back", 4), ("step", 5, 1)]
    assert opt.param_groups[0]["lr"] == 0.5 / 5 and w.item() == pytest.approx(1.0 - 0.1)


def test_train_epochs_counts_steps_across_epochs_from_the_first_epoch():
    w = nn.Parameter(torch.ones(()))
    seen = []
    hooks = Hooks(epoch_start=lambda e: seen.append(("start", e)), epoch_end=lambda e: seen.append(("end", e)))
    steps = train_epochs(torch.optim.SGD([w], lr=0.0), lambda e: [e, e], lambda b: w * b, epochs=3, first_epoch=1,
                         lr_at=lambda s: seen.append(("lr", s)) or 1.0, hooks=hooks)
    assert steps == 4
    assert seen == [("start", 1), ("lr", 0), ("lr", 1), ("end", 1), ("start", 2), ("lr", 2), ("lr", 3), ("end", 2)]


def test_eval_outputs_restores_the_mode_and_evaluate_reads_a_dict_output():
    class Tapped(nn.Module):
        def forward(self, x):
            assert not self.training and not torch.is_grad_enabled()
            return {"logit": torch.cat([x, -x], 1)}

    model = Tapped().train()
    x, y = torch.tensor([[1.0], [-1.0], [2.0]]), torch.tensor([0, 0, 0])
    assert [out["logit"].shape for out, _ in eval_outputs(model, [(x, y)])] == [(3, 2)]
    assert model.training
    result = evaluate(model, [(x, y)], device="cpu", output="logit")
    assert result.count == 3 and result.accuracy == pytest.approx(2 / 3)


def test_first_line():
    assert first_line(RuntimeError("  shape mismatch\nat line 3")) == "shape mismatch"
    assert first_line(RuntimeError("x" * 300), limit=200) == "x" * 200
    assert first_line(RuntimeError(""), default="RuntimeError") == "RuntimeError"



class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise KdOptunaError(f"item {i} cannot be read; replace it")


def test_an_error_raised_in_a_data_loader_worker_is_quoted_by_what_the_worker_said():
    from kd_optuna.errors import error_message

    with pytest.raises(KdOptunaError) as caught:
        next(iter(torch.utils.data.DataLoader(_Unreadable(), batch_size=1, num_workers=1)))
    assert str(caught.value).startswith("Caught KdOptunaError in DataLoader worker process 0.")
    assert "Traceback" in str(caught.value)
    assert error_message(caught.value) == first_line(caught.value) == "item 0 cannot be read; replace it"
    assert error_message(KdOptunaError("  Caught nothing\nsecond line ")) == "Caught nothing\nsecond line"
