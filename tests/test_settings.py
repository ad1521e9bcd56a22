"""Range and type checks of user settings (offsite.core.settings_types)."""

import pytest

from offsite.core.errors import OffsiteError
from offsite.core.settings_types import check_range


@pytest.mark.parametrize("bounds, value, message", [
    ({"at_least": 1}, 0, "n must be >= 1, got 0"),
    ({"above": 0}, 0.0, "n must be > 0, got 0.0"),
    ({"above": 0}, float("nan"), "n must be > 0, got nan"),
    ({"at_least": 0, "below": 1}, 1, r"n must be in \[0, 1\), got 1"),
    ({"above": 0, "at_most": 1}, 0, r"n must be in \(0, 1\], got 0"),
    ({"above": 0, "below": 1}, 2.5, r"n must be in \(0, 1\), got 2.5"),
])
def test_check_range_refuses_with_the_range_and_the_value(bounds, value, message):
    with pytest.raises(OffsiteError, match=f"^{message}$"):
        check_range("n", value, **bounds)


@pytest.mark.parametrize("bounds, value", [({"at_least": 1}, 1), ({"above": 0, "at_most": 1}, 1),
                                           ({"at_least": 0, "below": 1}, 0)])
def test_check_range_accepts_its_bounds(bounds, value):
    check_range("n", value, **bounds)
