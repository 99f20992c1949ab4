"""db_pooling's options in odoo.conf: the ``[db_pooling]`` section, and ``[options]`` as before.

Odoo 19 logs ``unknown option ... in the config file`` for every option of
``[options]`` it does not know, and keeps no other section (16-18 keep them in
``config.misc``). So db_pooling's options have a section of their own, as OCA's
queue_job has ``[queue_job]``, read by the addon from the file Odoo was started
with, the way Odoo reads it (configparser without interpolation, names
lowercased, ``True``/``False`` turned into booleans as Odoo 16-18 do)::

    [options]
    server_wide_modules = base,web,db_pooling
    db_host = 127.0.0.1

    [db_pooling]
    db_pool_max_connections = 12

Names are spelled as in ``[options]``, with no short forms: one name per option
in the file, the logs, the dashboard and the docs. The section takes
db_pooling's options only: a name it does not know, or one of Odoo's own
options (read by Odoo from ``[options]`` only), is an error naming it.
``[options]`` is still read: an option set in both places takes the section's
value (with a warning naming both), and options found in ``[options]`` get one
note saying to move them.
"""
import configparser
import difflib
import os

from ..errors import ConfigError
from . import tls
from .options import OPTION_NAMES
from .stock_options import STOCK_OPTIONS

SECTION = 'db_pooling'
# What the section takes: our options and the TLS settings stock Odoo does not know
# (db_sslmode is Odoo's: it stays in [options]).
NAMES = OPTION_NAMES + tuple(name for name in tls.option_names() if name != 'db_sslmode')


def odoo_value(raw):
    """A value of the file as Odoo 16-18 read it: True/False become booleans."""
    return {'True': True, 'true': True, 'False': False, 'false': False}.get(raw, raw)


def read_file(path):
    """``{section: {name: raw value}}`` of the odoo.conf at ``path``; None when there is no
    such file. ConfigError naming the file when it cannot be read or parsed."""
    parser = configparser.RawConfigParser()     # as Odoo's: no interpolation, names lowercased
    try:
        with open(path, encoding='utf-8') as handle:
            parser.read_file(handle)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f'db_pooling cannot read the config file {path} ({exc.strerror}): '
                          f'make it readable by the user Odoo runs as (uid {os.getuid()}).') from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise ConfigError(f'db_pooling cannot parse the config file {path} ({reason}): fix '
                          f'the file.') from None
    return {name: dict(parser.items(name)) for name in parser.sections()}


def _unknown(name, path):
    if name in {option.name for option in STOCK_OPTIONS}:
        return (f'{name} in [{SECTION}] of {path} is an Odoo option, which Odoo reads from '
                f'[options] only: move it there.')
    close = difflib.get_close_matches(name, NAMES, 1)
    hint = f' (did you mean {close[0]}?)' if close else ''
    return (f'{name} in [{SECTION}] of {path} is not a db_pooling option{hint}: fix its name, '
            f'or move it to [options] if it is an option of Odoo or of another module.')


class PoolingOptions:
    """The options db_pooling reads: from ``[db_pooling]`` first, else from ``[options]``.

    :param sections: the file's sections (:func:`read_file`).
    :param options_get: the getter of ``[options]`` (``odoo.tools.config.get`` in Odoo).

    ``get`` is the getter :func:`.options.load_settings` and :mod:`.tls` take,
    ``where(name)`` names for messages the file and section a value comes from,
    ``problems`` lists the names the section does not take, ``notes()`` the
    warnings to log once.
    """

    def __init__(self, path, sections, options_get, unread=None):
        self.path = path
        self.unread = unread        # why the file could not be read (Odoo 19), if so
        self.has_options = 'options' in (sections or {})
        self.section = {name: odoo_value(value)
                        for name, value in (sections or {}).get(SECTION, {}).items()}
        self.problems = [_unknown(name, path) for name in self.section if name not in NAMES]
        in_options = [name for name in NAMES if name in (sections or {}).get('options', {})]
        self.in_options = [name for name in in_options if name not in self.section]
        self.in_both = [name for name in in_options if name in self.section]
        self._options_get = options_get

    def get(self, name, default=None):
        """The value of ``name``; empty or ``None`` (as Odoo writes unset options) is not
        set, in either section, for Odoo and ``odoo-pool check`` alike."""
        value = self.section[name] if name in self.section else self._options_get(name, default)
        return default if value in ('', 'None') else value

    def where(self, name):
        return f'{self.path} [{SECTION if name in self.section else "options"}]'

    def notes(self):
        notes = []
        if self.unread:
            notes.append(f'db_pooling: cannot read a [{SECTION}] section from {self.path} '
                         f'({self.unread}): only db_pooling options in [options] are used; '
                         f'give Odoo a readable config file.')
        if self.in_both:
            notes.append(f'db_pooling: {", ".join(self.in_both)} set both in [{SECTION}] and in '
                         f'[options] of {self.path}: the [{SECTION}] value is used; remove the '
                         f'[options] line.')
        if self.in_options:
            notes.append(f'db_pooling: {", ".join(self.in_options)} read from [options] of '
                         f'{self.path}: move {"them" if len(self.in_options) > 1 else "it"} to a '
                         f'[{SECTION}] section of that file, same names (in [options] Odoo 19 '
                         f'logs "unknown option" for each; see docs/configuration.rst).')
        return notes


def config_path(config):
    """The odoo.conf Odoo was started with (16-18: ``config.rcfile``; 19: ``config['config']``,
    its ``rcfile`` being a deprecated property)."""
    return vars(config).get('rcfile') or config.get('config')


def from_odoo(config):
    """The options of the running Odoo (``odoo.tools.config``): its file's section, else
    ``[options]`` as Odoo parsed it. With no file, Odoo's own values.

    Odoo 16-18 keep the file's other sections (``config.misc``, parsed when Odoo read the
    file): read there, not from the file again (a pipe given as ``-c`` is empty the second
    time). Odoo 19 keeps none: the file is read again; one Odoo could not read either
    (Odoo then runs on its defaults: a missing ~/.odoorc, a file of another user) or that
    is not a regular file gives a warning, not a stop."""
    path = config_path(config)
    misc = vars(config).get('misc')
    if isinstance(misc, dict):
        sections = {name: dict(values) for name, values in misc.items()}
        options = vars(config).get('options') or {}
        sections['options'] = {name: options[name] for name in NAMES if name in options}
        return PoolingOptions(path, sections, config.get)
    if not path:
        return PoolingOptions(path, None, config.get)
    unread = None
    if os.path.exists(path) and not os.path.isfile(path):
        unread = 'not a regular file'
    elif os.path.exists(path) and not os.access(path, os.R_OK):
        unread = f'not readable by uid {os.getuid()}'
    sections = None if unread else read_file(path)
    return PoolingOptions(path, sections, config.get, unread)


def from_file(path):
    """The options of the odoo.conf at ``path``, for commands that run without Odoo; ``[options]``
    read as Odoo 16-18 read it (True/False as booleans), ``None`` and empty meaning not set."""
    sections = read_file(path)
    if sections is None:
        raise ConfigError(f'cannot read {path}: no such file.')
    options = sections.get('options', {})

    def get(name, default=None):
        return odoo_value(options.get(name, default))
    return PoolingOptions(path, sections, get)
