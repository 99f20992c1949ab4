"""Option parsing and validation: every bad value names the option and what is allowed."""
import pytest

from odoo_pool_patch.errors import ConfigError
from odoo_pool_patch.config.options import OPTIONS, Settings, load_settings


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
    from odoo_pool_patch.odoo_glue.odoo_install import job_runner_environ
    direct = Settings(direct_host='pg.internal', direct_port=5433)
    assert job_runner_environ(Settings(), {}, {}) == {}
    assert job_runner_environ(direct, {}, {}) == {
        'ODOO_QUEUE_JOB_JOBRUNNER_DB_HOST': 'pg.internal', 'ODOO_QUEUE_JOB_JOBRUNNER_DB_PORT': '5433'}
    assert job_runner_environ(direct, {}, {'jobrunner_db_host': 'own'}) == {}
    assert job_runner_environ(direct, {'ODOO_QUEUE_JOB_JOBRUNNER_DB_HOST': 'own'}, {}) == {}


def test_false_is_off_for_on_off_options():
    """Odoo 16-18 turn "False" in odoo.conf into False: for an on/off option that is off."""
    settings = load_settings({'db_pool_shared': False, 'db_pool_retry_terminated': 'False',
                              'db_pool_wait_timeout': False}.get)
    assert settings.shared is False and settings.retry_terminated is False
    assert settings.wait_timeout == Settings().wait_timeout


def write(tmp_path, text):
    path = tmp_path / 'odoo.conf'
    path.write_text(text)
    return str(path)


def test_the_section_first_then_options_and_where_each_comes_from(tmp_path):
    from odoo_pool_patch.config.conf_file import from_file
    path = write(tmp_path, '[options]\ndb_host = pg\ndb_pool_idle_timeout = 5\n'
                           'db_pool_wait_timeout = 3\n\n[db_pooling]\ndb_pool_wait_timeout = 4\n'
                           'db_pool_shared = False\ndb_pool_metrics_token = 100%-sure-0123456789\n')
    source = from_file(path)
    settings = load_settings(source.get, source=source.where)
    assert (settings.wait_timeout, settings.idle_timeout, settings.shared) == (4, 5, False)
    assert settings.metrics_token == '100%-sure-0123456789'     # no interpolation
    assert source.get('db_host') == 'pg' and source.problems == []
    assert source.where('db_pool_wait_timeout') == f'{path} [db_pooling]'
    assert source.where('db_pool_idle_timeout') == f'{path} [options]'
    assert source.notes() == [
        f'db_pooling: db_pool_wait_timeout set both in [db_pooling] and in [options] of {path}: '
        f'the [db_pooling] value is used; remove the [options] line.',
        f'db_pooling: db_pool_idle_timeout read from [options] of {path}: move it to a '
        f'[db_pooling] section of that file, same names (in [options] Odoo 19 logs "unknown '
        f'option" for each; see docs/configuration.rst).']
    bad = from_file(write(tmp_path, '[options]\n[db_pooling]\ndb_pool_idle_timeout = x\n'))
    with pytest.raises(ConfigError, match=rf"db_pool_idle_timeout = 'x' in {path} \[db_pooling\]"):
        load_settings(bad.get, source=bad.where)


def test_tls_problems_name_the_file_and_section(tmp_path):
    from odoo_pool_patch.config import tls
    from odoo_pool_patch.config.conf_file import from_file
    path = write(tmp_path, '[options]\ndb_sslmode = verify-full\n\n[db_pooling]\n'
                           'db_sslrootcert = relative/ca.crt\n')
    source = from_file(path)
    assert tls.validate(source.get, where=source.where) == [
        f"db_sslrootcert = 'relative/ca.crt' in {path} [db_pooling] must be an absolute path."]


@pytest.mark.parametrize('text, expected', [
    (None, 'db_pooling cannot read the config file {path} (Is a directory): make it readable '
           'by the user Odoo runs as'),
    ('db_pool_wait_timeout = 3\n', 'db_pooling cannot parse the config file {path} (File '
                                   'contains no section headers.): fix the file.'),
    ('[db_pooling]\na = 1\na = 2\n', 'db_pooling cannot parse the config file {path} (While '
                                     'reading from'),
])
def test_a_file_that_cannot_be_read_is_named(tmp_path, text, expected):
    from odoo_pool_patch.config.conf_file import read_file
    path = str(tmp_path) if text is None else write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        read_file(path)
    assert expected.format(path=path) in str(excinfo.value)
    assert read_file(str(tmp_path / 'missing.conf')) is None     # Odoo starts on its defaults


def test_none_and_empty_mean_unset_for_odoo_and_check_alike(tmp_path):
    """``x = None`` or ``x =`` is how Odoo writes an unset option: default, in the section
    and in [options], through Odoo's getter (raw strings, as Odoo 19 keeps unknown
    options) as through ``odoo-pool check``'s reading of the file."""
    from odoo_pool_patch.config.conf_file import PoolingOptions, from_file
    text = ('[options]\ndb_pool_idle_timeout = None\ndb_pool_wait_timeout =\n\n'
            '[db_pooling]\ndb_pool_max_lifetime = None\n')
    path = write(tmp_path, text)
    odoo = {'db_pool_idle_timeout': 'None', 'db_pool_wait_timeout': ''}
    running = PoolingOptions(path, {'db_pooling': {'db_pool_max_lifetime': 'None'}}, odoo.get)
    for source in (from_file(path), running):
        assert load_settings(source.get, source=source.where) == Settings()
