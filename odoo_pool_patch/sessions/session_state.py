"""Which statements leave state in a PostgreSQL session, and how to clear it.

:func:`session_kinds` returns a bit mask of :data:`KINDS` for one query text.
It decides the text of every ``execute`` of our connections (once per text:
:func:`known_kinds` remembers it), so ordinary statements are decided by a fast
check without parsing: the first word is not one that can
change session state (``SET``, ``RESET``, ``LISTEN``, ``CREATE``, ``DECLARE``,
``PREPARE``, ``LOAD``, ``DO``) and the text mentions neither an advisory lock
function, nor ``set_config``, nor a ``;`` (a second statement). Only the rest,
the candidates, are confirmed with sqlparse, which sees through comments,
quoting and case (``SET LOCAL``, ``pg_advisory_xact_lock``, ``set_config(...,
true)`` and names inside strings or comments do not count). Without sqlparse
(it is not in Odoo's own requirements) :func:`confirm_without_sqlparse` decides
with regular expressions: the same for the first words, and erring on the
dirty side for names that could sit in comments or strings.

Privileges are never left to chance: ``RESET ALL`` leaves ``role`` and
``session_authorization`` alone (PostgreSQL flags both ``NO_RESET_ALL``), so every
reset of settings also resets them (``SET`` implies the role's reset, whatever
the spelling: ``SET SESSION ROLE``, ``SET "role"``, ``set_config('role', ...)``,
a ``set_config`` whose arguments are parameters, one inside a ``PREPARE``), and
what runs code we cannot see into (``DO``, ``CALL``) gets the full reset, which
includes ``SET SESSION AUTHORIZATION DEFAULT``. A user function that changes the
role itself is caught when that crosses the superuser line: the server reports
``is_superuser`` without a round trip (:func:`.session_tracking.privileges_changed`);
one switching between two ordinary roles is left to the periodic full reset
(``db_pool_reset_every``).

Not seen by parsing, so left to the periodic full reset as well: other state set
by a user function (``SELECT my_func()`` that calls ``set_config``),
``SELECT ... INTO TEMP``, and sequence state (``currval``).
"""
import functools
import re
import threading

SET = 1 << 0          # SET / RESET / set_config(..., false) / SET SESSION CHARACTERISTICS
ROLE = 1 << 1         # SET [SESSION] ROLE, SET SESSION AUTHORIZATION (and implied by SET)
LISTEN = 1 << 2
ADVISORY = 1 << 3     # session advisory locks (not the _xact_ ones)
TEMP = 1 << 4         # CREATE TEMP ...
HOLD = 1 << 5         # DECLARE ... WITH HOLD
PREPARE = 1 << 6      # PREPARE name AS ... (not PREPARE TRANSACTION)
LOAD = 1 << 7         # a loaded library cannot be unloaded: the connection is closed
AUTOCOMMIT = 1 << 8   # the connection went to autocommit (client-side state psycopg2 resets)
UNKNOWN = 1 << 9      # something we cannot clear narrowly: DISCARD ALL
COMMITTED = 1 << 10   # COMMIT / END / PREPARE TRANSACTION sent as SQL: psycopg2 believes
                      # a transaction is still open (the full reset), and what ran before
                      # may be committed (request_retry never runs the request again)

KINDS = {'set': SET, 'role': ROLE, 'listen': LISTEN, 'advisory': ADVISORY, 'temp': TEMP,
         'hold': HOLD, 'prepare': PREPARE, 'load': LOAD, 'autocommit': AUTOCOMMIT,
         'unknown': UNKNOWN, 'committed': COMMITTED}
# Kinds that only work in a real session: broken behind a transaction pooler.
SESSION_ONLY = LISTEN | ADVISORY | HOLD | PREPARE
# Kinds cleared by the full reset (psycopg2's reset(): ABORT + DISCARD ALL).
FULL = AUTOCOMMIT | UNKNOWN | COMMITTED

# Narrowest statements that clear each kind, in the order they must run (the
# role first, so that RESET ALL and the rest run as the session user).
_NARROW = ((ROLE, 'RESET SESSION AUTHORIZATION; RESET ROLE'), (SET, 'RESET ALL'),
           (LISTEN, 'UNLISTEN *'), (ADVISORY, 'SELECT pg_advisory_unlock_all()'),
           (TEMP, 'DISCARD TEMP'), (HOLD, 'CLOSE ALL'), (PREPARE, 'DEALLOCATE ALL'))


def names(mask):
    """The kind names in ``mask``, e.g. ``['set', 'listen']``."""
    return [name for name, bit in KINDS.items() if mask & bit]


def narrow_reset(mask):
    """One SQL text (one round trip) clearing the narrowly clearable kinds of ``mask``.
    A reset of settings always resets the role and session authorization too: a
    setting may be one of those two under another spelling (``SET "role"``,
    ``set_config($1, ...)``), and ``RESET ALL`` does not reset them."""
    if mask & SET:
        mask |= ROLE
    return '; '.join(sql for bit, sql in _NARROW if mask & bit)


# ------------------------------------------------------------------ fast check
_HEAD = re.compile(r'\s*([A-Za-z]+)')
_CANDIDATE_HEADS = frozenset(('SET', 'RESET', 'LISTEN', 'CREATE', 'DECLARE', 'PREPARE',
                              'LOAD', 'DO', 'CALL', 'EXPLAIN', 'COMMIT', 'END'))


# Texts already decided, for known_kinds: Odoo sends the same few hundred texts over and
# over (its parameters travel apart), and a dict lookup (the text's hash and one compare)
# costs a tenth of the fast check on a 700-character SELECT. Bounded per process: by
# entries and by an estimate of the memory they hold (4 bytes a character for a text that
# is not ASCII, plus the entry's own); texts over KNOWN_MAX_TEXT characters are decided
# each time (rare, and costly to hold). Inserts take a lock (a miss is rare), lookups none.
_KNOWN = {}
_KNOWN_SIZE = [0]
_KNOWN_LOCK = threading.Lock()
KNOWN_MAX_BYTES = 1 << 20
KNOWN_MAX_ENTRIES = 4096
KNOWN_MAX_TEXT = 8192
_ENTRY_BYTES = 120


def known_kinds(query):
    """:func:`session_kinds` of ``query``, remembered for the next time the same text
    comes (the cursors' hot path). Only a plain ``str`` is remembered (a subclass may
    compare equal to other texts). A text with values written into it (a ``psycopg2.sql``
    literal, an id formatted in) takes room until the next start-over, nothing else."""
    if type(query) is not str or len(query) > KNOWN_MAX_TEXT:
        return session_kinds(query)
    kinds = _KNOWN.get(query)
    if kinds is None:
        kinds = session_kinds(query)
        size = len(query) * (1 if query.isascii() else 4) + _ENTRY_BYTES
        with _KNOWN_LOCK:
            if _KNOWN_SIZE[0] + size > KNOWN_MAX_BYTES or len(_KNOWN) >= KNOWN_MAX_ENTRIES:
                _KNOWN.clear()
                _KNOWN_SIZE[0] = 0
            if query not in _KNOWN:
                _KNOWN[query] = kinds
                _KNOWN_SIZE[0] += size
    return kinds


def forget_decided():
    """Empty the caches of decided texts (:func:`known_kinds`, :func:`confirm`): tests that
    change how texts are decided."""
    with _KNOWN_LOCK:
        _KNOWN.clear()
        _KNOWN_SIZE[0] = 0
    confirm.cache_clear()


def session_kinds(query):
    """Bit mask of the session state ``query`` (a str) may leave behind; 0 for most."""
    head = _HEAD.match(query)
    if head is not None and head.group(1).upper() not in _CANDIDATE_HEADS:
        low = query.lower()
        # ('pg_': pg_settings, pg_background_*; 'dblink': dblink_exec and friends)
        if 'advisory' not in low and 'set_config' not in low and ';' not in low and \
                'u&' not in low and 'pg_' not in low and 'dblink' not in low:
            return 0
    return confirm(query)


# ------------------------------------------------------------------ confirmation
_SESSION_LOCKS = frozenset(('pg_advisory_lock', 'pg_advisory_lock_shared',
                            'pg_try_advisory_lock', 'pg_try_advisory_lock_shared'))


_UNICODE_NAME = re.compile(r'u&\s*"', re.I)
_OTHER_SESSION = re.compile(r'dblink|pg_background', re.I)
_SETTINGS_UPDATE = re.compile(r'\bupdate\b[^;]*\bpg_settings\b', re.I | re.S)


@functools.lru_cache(maxsize=2048)      # Odoo repeats the same texts
def confirm(query):
    """Parse a candidate and return the kinds it really has. Where sqlparse may read a
    text otherwise than PostgreSQL (a backslash: ``\\'`` ends a standard string for
    PostgreSQL, not for sqlparse; a block comment: they nest for PostgreSQL only), the
    regular expressions' conservative reading is added. Names written with Unicode
    escapes (``U&"..."``) could be any function: the full reset."""
    # Another session that commits on its own: dblink, pg_background (names anywhere).
    other = COMMITTED if _OTHER_SESSION.search(query) else 0
    if _UNICODE_NAME.search(query):
        return UNKNOWN | other
    try:
        import sqlparse
        from sqlparse import tokens as T
    except ImportError:     # not installed in Odoo's environment (PYTHONPATH install)
        return confirm_without_sqlparse(query)
    mask = confirm_without_sqlparse(query) if '\\' in query or '/*' in query else 0
    if 'pg_settings' in query.lower() and _SETTINGS_UPDATE.search(query):
        mask |= SET             # UPDATE pg_settings SET setting = ... is a SET
    mask |= other
    for statement in sqlparse.parse(query):
        words = [tok for tok in statement.flatten()
                 if not tok.is_whitespace and tok.ttype not in T.Comment]
        if words:
            mask |= _statement_kinds(words, T)
    return mask


def _keywords(words, start, count):
    return [tok.normalized.upper() if tok.is_keyword else None
            for tok in words[start:start + count]]


def _statement_kinds(words, T):
    # sqlparse reads 'CREATE OR REPLACE' as one keyword.
    first = words[0].normalized.upper().split()[0] if words[0].is_keyword else None
    second, third = (_keywords(words, 1, 2) + [None, None])[:2]
    if first == 'SET':
        if second in ('LOCAL', 'TRANSACTION', 'CONSTRAINTS'):
            return 0
        if second == 'ROLE' or (second == 'SESSION' and third in ('AUTHORIZATION', 'ROLE')):
            return ROLE
        return SET
    if first == 'RESET':
        return ROLE if second == 'ROLE' or (second == 'SESSION' and third == 'AUTHORIZATION') \
            else SET
    if first == 'LISTEN':
        return LISTEN
    if first == 'LOAD':
        return LOAD
    if first in ('COMMIT', 'END'):
        return COMMITTED
    if first in ('DO', 'CALL'):
        return UNKNOWN       # runs code we cannot see into
    if first == 'EXPLAIN':   # EXPLAIN ANALYZE runs the statement
        analyze = any(tok.normalized.upper() in ('ANALYZE', 'ANALYSE') for tok in words[1:4]
                      if tok.is_keyword or T is None)
        return UNKNOWN if analyze else (_call_kinds(words, T) if T is not None else 0)
    if first == 'PREPARE':
        # Its EXECUTE runs the body later: what the body calls counts now.
        if second == 'TRANSACTION':
            return COMMITTED    # another session may COMMIT PREPARED it
        return PREPARE | (_call_kinds(words, T) if T is not None else 0)  # (else: regexes)
    if first == 'DECLARE':
        keywords = [tok.normalized.upper() for tok in words if tok.is_keyword]
        for before, after in zip(keywords, keywords[1:]):
            if before == 'FOR':
                break
            if before == 'WITH' and after == 'HOLD':
                return HOLD
        return 0
    if first == 'CREATE':
        # CREATE [OR REPLACE] [GLOBAL|LOCAL] TEMP|TEMPORARY ...
        for keyword in _keywords(words, 1, 4):
            if keyword in ('TEMP', 'TEMPORARY'):
                return TEMP
            if keyword not in ('OR', 'REPLACE', 'OR REPLACE', 'GLOBAL', 'LOCAL'):
                break
        return 0
    return _call_kinds(words, T)


def _call_kinds(words, T):
    """Session advisory locks and set_config(..., false) called anywhere in a statement."""
    mask = 0
    for index, tok in enumerate(words[:-1]):
        if tok.ttype in T.Name or tok.ttype in T.String.Symbol:
            name = tok.value.strip('"').lower()
        elif tok.is_keyword:
            name = tok.normalized.lower()
        else:
            continue
        if words[index + 1].value != '(':
            continue
        if name in _SESSION_LOCKS:
            mask |= ADVISORY
        elif name == 'set_config' and _is_local_false(words, index + 2):
            mask |= SET
    return mask


def _is_local_false(words, start):
    """Whether the third argument of a call starting at ``words[start]`` is not
    literally ``true`` (a parameter or an expression counts as session-wide)."""
    depth, commas, third = 0, 0, []
    for tok in words[start:]:
        if tok.value == '(':
            depth += 1
        elif tok.value == ')':
            if depth == 0:
                break
            depth -= 1
        elif tok.value == ',' and depth == 0:
            commas += 1
            continue
        if commas == 2:
            third.append(tok.value.lower())
    return third != ['true'] and third != ["'true'"] and third != ['true::boolean']


# ------------------------------------------------------------------ without sqlparse
_WORD = re.compile(r'[A-Za-z_]+')
# Any mention counts (a comment may sit between the name and its parenthesis), but a
# set_config call whose third argument is plainly true, with nothing else in between.
_LOCK_CALL = re.compile(r'pg_(?:try_)?advisory_lock(?:_shared)?\b')
_SET_CONFIG = re.compile(r'set_config')
_ARGUMENT = r"\s*(?:'[^'\\]*'|%s|%\(\w+\)s|\$\d+)\s*"
_SET_CONFIG_LOCAL = re.compile(rf'set_config"?\s*\({_ARGUMENT},{_ARGUMENT},\s*true\s*\)')


def _skip_comments(text):
    """``text`` after its leading blanks and comments (block comments nest)."""
    at, size = 0, len(text)
    while at < size:
        if text[at].isspace():
            at += 1
        elif text.startswith('--', at):
            end = text.find('\n', at)
            at = size if end < 0 else end + 1
        elif text.startswith('/*', at):
            depth, at = 1, at + 2
            while at < size and depth:
                if text.startswith('/*', at):
                    depth, at = depth + 1, at + 2
                elif text.startswith('*/', at):
                    depth, at = depth - 1, at + 2
                else:
                    at += 1
        else:
            break
    return text[at:]


class _Word:
    """The little of a sqlparse token that :func:`_statement_kinds` reads."""
    __slots__ = ('value', 'normalized')
    is_keyword = True
    ttype = None

    def __init__(self, value):
        self.value = value
        self.normalized = value.upper()


def confirm_without_sqlparse(query):
    """:func:`confirm` with regular expressions: exact for statements starting
    with a session keyword, conservative for function calls (a name inside a
    string or comment counts)."""
    mask = COMMITTED if _OTHER_SESSION.search(query) else 0
    for part in query.split(';'):
        text = _skip_comments(part)
        words = [_Word(word) for word in _WORD.findall(text)]
        if not words:
            continue
        head = words[0].normalized
        if head in ('DO', 'CALL') or (head == 'EXPLAIN' and re.match(
                r'EXPLAIN\s*(?:\(\s*)?ANALY[SZ]E', text.upper())):
            mask |= UNKNOWN
            continue
        if head == 'END' and mask & UNKNOWN:
            continue            # the END of a DO block's body (split at its ';')
        if head in _CANDIDATE_HEADS:
            mask |= _statement_kinds(words, None) if head != 'DECLARE' else (
                HOLD if re.search(r'\bWITH\s+HOLD\b', text.upper().split(' FOR ')[0]) else 0)
            if head != 'PREPARE':
                continue
        low = text.lower()
        if _LOCK_CALL.search(low):
            mask |= ADVISORY
        if _SET_CONFIG.search(low) and len(_SET_CONFIG.findall(low)) != len(
                _SET_CONFIG_LOCAL.findall(low)):
            mask |= SET
        if 'pg_settings' in low and _SETTINGS_UPDATE.search(low):
            mask |= SET         # UPDATE pg_settings SET setting = ... is a SET
    return mask
