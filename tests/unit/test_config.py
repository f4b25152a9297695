from pathlib import Path

import pytest

from recsketch.config import Settings
from recsketch.errors import ConfigError


def test_defaults_follow_design_section_5() -> None:
    settings = Settings.from_env({})
    assert settings.data_dir == Path("data") and settings.backbone == "efficientnet_lite0"
    assert settings.sketchfab_url == "https://api.sketchfab.com"
    assert settings.likes_base_url == "https://sketchfab.com"
    assert settings.resolved_database_url == f"sqlite:///{Path('data/recsketch.sqlite').resolve()}"
    assert settings.effective_rate_limit == 10.0 and settings.allowed_thumbnail_hosts == ("media.sketchfab.com",)
    local = Settings.from_env({"RECSKETCH_SKETCHFAB_URL": "http://127.0.0.1:8765/", "RECSKETCH_RATE_LIMIT": "0"})
    assert local.sketchfab_url == local.likes_base_url == "http://127.0.0.1:8765"
    assert local.effective_rate_limit is None and local.allowed_thumbnail_hosts == ()


@pytest.mark.parametrize(("env", "message"), [
    ({"RECSKETCH_TOP_K": "0"}, r"RECSKETCH_TOP_K=0 must be at least 1"),
    ({"RECSKETCH_TOP_K": "ten"}, r"RECSKETCH_TOP_K='ten' is not an integer"),
    ({"RECSKETCH_MIN_LIKES": "-1"}, r"RECSKETCH_MIN_LIKES=-1 must be at least 0"),
    ({"RECSKETCH_RATE_LIMIT": "fast"}, r"RECSKETCH_RATE_LIMIT='fast' is not a number"),
    ({"RECSKETCH_RATE_LIMIT": "-2"}, r"RECSKETCH_RATE_LIMIT=-2 must be at least 0"),
    ({"RECSKETCH_BACKBONE": "resnet"},
     r"backbone 'resnet' is not one of efficientnet_lite0, vgg16 \(RECSKETCH_BACKBONE\)"),
    ({"RECSKETCH_VGG16_PRECISION": "fp8"}, r"vgg16 precision 'fp8' is not one of float32, bfloat16"),
    ({"RECSKETCH_PREPROCESS": "squash"}, r"preprocess 'squash' is not one of crop, seed"),
    ({"RECSKETCH_LIKES_MAX_AGE_DAYS": "-1"}, r"RECSKETCH_LIKES_MAX_AGE_DAYS=-1 must be at least 0"),
    ({"RECSKETCH_DATABASE_URL": "mysql+pymysql://u@db/recs"}, r"is 'mysql' .*only postgresql and sqlite"),
    ({"RECSKETCH_DATABASE_URL": "not a url"}, r"RECSKETCH_DATABASE_URL .* is not a SQLAlchemy URL"),
])
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_cli_reports_bad_config_in_one_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "RECSKETCH_TOP_K": "-3", "RECSKETCH_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "recsketch.cli", "similar", "a" * 32], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == "recsketch: RECSKETCH_TOP_K=-3 must be at least 1"


def test_flags_and_overrides_go_through_the_same_checks_and_beat_the_environment() -> None:
    env = Settings.from_env({"RECSKETCH_TOP_K": "7", "RECSKETCH_CHUNK_SIZE": "64"})
    assert (env.top_k, env.chunk_size) == (7, 64)
    flagged = env.with_overrides(top_k=3, chunk_size=None)  # a flag given, one not given
    assert (flagged.top_k, flagged.chunk_size) == (3, 64)
    with pytest.raises(ConfigError, match=r"^top_k=0 must be at least 1$"):
        env.with_overrides(top_k=0)
    with pytest.raises(ConfigError, match=r"backbone 'resnet' is not one of efficientnet_lite0, vgg16 \(backbone\)"):
        env.with_overrides(backbone="resnet")
    with pytest.raises(ConfigError, match="mysql"):
        env.with_overrides(database_url="mysql+pymysql://u@db/recs")


def test_the_cli_flag_is_checked_by_settings(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "RECSKETCH_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "recsketch.cli", "plan", "--run-id", "r", "--top-k", "0"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == "recsketch: top_k=0 must be at least 1"
