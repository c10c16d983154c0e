"""EDM2 power EMA (docs/losses.md, ema): gamma from the rate and the beta table."""

import pytest
import torch

from rcm_losses.ema import ema_beta, ema_gamma, ema_update_


def test_gamma_is_the_root_for_rate_0_1():
    g = ema_gamma(0.1)
    assert g == pytest.approx(6.9372, abs=1e-4)  # docs/losses.md, ema
    assert g**3 + 7 * g**2 + (16 - 100) * g + (12 - 100) == pytest.approx(0.0, abs=1e-9)
    # EDM2's relative standard deviation of the power profile with this exponent is the rate
    assert ((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 == pytest.approx(0.1, rel=1e-12)


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.2, 0.28])
def test_gamma_for_other_rates(rate):
    g = ema_gamma(rate)
    assert g > 0 and ((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 == pytest.approx(rate, rel=1e-10)


# docs/losses.md, ema: beta(1)=0.004, beta(10)=0.469, beta(100)=0.924, beta(1000)=0.9921, beta(10^4)=0.99921
@pytest.mark.parametrize("k, beta, digits", [(1, 0.004, 3), (10, 0.469, 3), (100, 0.924, 3),
                                             (1000, 0.9921, 4), (10_000, 0.99921, 5)])
def test_beta_table(k, beta, digits):
    assert round(ema_beta(k, 0.1), digits) == beta


def test_beta_is_zero_before_the_first_step():
    assert ema_beta(0) == 0.0 and ema_beta(-3) == 0.0


def test_bad_rate():
    for rate in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="rate"):
            ema_gamma(rate)


def test_update_in_place():
    ema = [torch.zeros(3), torch.ones(2, 2)]
    params = [torch.ones(3, dtype=torch.bfloat16), torch.zeros(2, 2, dtype=torch.bfloat16)]
    ema_update_(ema, params, 0.75)
    assert ema[0].dtype == torch.float32
    torch.testing.assert_close(ema[0], torch.full((3,), 0.25))
    torch.testing.assert_close(ema[1], torch.full((2, 2), 0.75))
    ema_update_(ema, params, 0.0)  # beta = 0 copies the parameters
    torch.testing.assert_close(ema[0], torch.ones(3))
    with pytest.raises(ValueError, match="tensors"):
        ema_update_(ema, params[:1], 0.5)
    with pytest.raises(ValueError, match="shape"):
        ema_update_([torch.zeros(3)], [torch.zeros(4)], 0.5)
