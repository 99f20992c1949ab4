"""Option parsing and validation: every bad value names the option and what is allowed."""
import pytest

from odoo_pool_patch.errors import ConfigError
from odoo_pool_patch.options import OPTIONS, Settings, load_settings


def test_defaults_when_nothing_is_set():
    assert load_settings({}.get) == Settings()
    assert Settings().wait_timeout == 20 and Settings().idle_timeout == 60
    assert Settings().max_lifetime == 3600 and Settings().check_after == 30
    assert Settings().leak_warn_after == 300


def test_odoo_not_set_values_mean_default():
    conf = {'db_pool_wait_timeout': False, 'db_pool_idle_timeout': '', 'db_pool_max_lifetime': None}
    assert load_settings(conf.get) == Settings()


def test_values_from_strings_and_numbers():
    conf = {'db_pool_wait_timeout': '5', 'db_pool_idle_timeout': 30, 'db_pool_max_lifetime': '0',
            'db_pool_check_after': ' 2.5 ', 'db_pool_leak_warn_after': 0}
    settings = load_settings(conf.get)
    assert settings == Settings(wait_timeout=5, idle_timeout=30, max_lifetime=0,
                                check_after=2.5, leak_warn_after=0)


@pytest.mark.parametrize('value', ['-1', 'abc', 'nan', 'inf', '1e999', '10s'])
def test_bad_values_name_option_value_and_allowed(value):
    with pytest.raises(ConfigError) as excinfo:
        load_settings({'db_pool_wait_timeout': value}.get)
    message = str(excinfo.value)
    assert 'db_pool_wait_timeout' in message and repr(value) in message
    assert 'a number of seconds >= 0' in message and 'odoo.conf' in message


def test_all_bad_values_reported_together():
    with pytest.raises(ConfigError) as excinfo:
        load_settings({'db_pool_wait_timeout': 'x', 'db_pool_idle_timeout': '-3'}.get)
    assert 'db_pool_wait_timeout' in str(excinfo.value)
    assert 'db_pool_idle_timeout' in str(excinfo.value)


def test_every_option_is_documented():
    for option in OPTIONS:
        assert option.name.startswith('db_') and len(option.doc) > 40


def test_job_runner_goes_direct_unless_configured_otherwise():
    from odoo_pool_patch.odoo_install import job_runner_environ
    direct = Settings(direct_host='pg.internal', direct_port=5433)
    assert job_runner_environ(Settings(), {}, {}) == {}
    assert job_runner_environ(direct, {}, {}) == {
        'ODOO_QUEUE_JOB_JOBRUNNER_DB_HOST': 'pg.internal', 'ODOO_QUEUE_JOB_JOBRUNNER_DB_PORT': '5433'}
    assert job_runner_environ(direct, {}, {'jobrunner_db_host': 'own'}) == {}
    assert job_runner_environ(direct, {'ODOO_QUEUE_JOB_JOBRUNNER_DB_HOST': 'own'}, {}) == {}
