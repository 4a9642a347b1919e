import pytest

from alssl.budget import budget_count, parse_budget
from alssl.errors import UserError


@pytest.mark.parametrize(
    "text, n",
    [("2%", 29), ("10%", 144), ("0.1%", 1), ("100%", 1437), ("500", 500), (" 7 ", 7), ("1.5%", 22), (".5%", 7)],
)
def test_budget_grammar(text, n):
    assert budget_count(text, n_pool=1437) == n


@pytest.mark.parametrize("text", ["abc", "0", "-5", "150%", "2.5.1%", "0%", "", "1.5", "5 %%", "1e3"])
def test_bad_budgets_are_user_errors(text):
    with pytest.raises(UserError, match="budget"):
        budget_count(text, n_pool=1437)


def test_budget_larger_than_unlabeled_pool():
    with pytest.raises(UserError, match="only 10 unlabeled"):
        parse_budget("11", n_pool=1437, n_unlabeled=10)
    assert parse_budget("10", n_pool=1437, n_unlabeled=10) == 10
