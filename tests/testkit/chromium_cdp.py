"""Drive a real headless Chromium through the DevTools protocol, for the dashboard test.

``--remote-debugging-pipe``: Chromium reads commands on fd 3 and writes answers
and events on fd 4, NUL-terminated JSON. No websocket library, no extra package.
"""
import base64
import json
import os
import shutil
import subprocess
import threading
import time

CHROMIUM_NAMES = ('chromium', 'chromium-browser', 'google-chrome')


def find_chromium():
    for name in CHROMIUM_NAMES:
        path = shutil.which(name) or (f'/usr/bin/{name}' if os.access(f'/usr/bin/{name}', os.X_OK)
                                      else None)
        if path:
            return path
    return None


class Chromium:
    """One headless browser with one page; ``errors`` collects the page's JavaScript errors."""

    def __init__(self, binary, profile_dir, width=1400, height=1800):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        args = [binary, '--headless', '--remote-debugging-pipe', '--no-first-run',
                '--no-default-browser-check', '--disable-gpu', '--disable-extensions',
                '--disable-background-networking', f'--user-data-dir={profile_dir}',
                f'--window-size={width},{height}', 'about:blank']
        if os.geteuid() == 0:
            args.insert(1, '--no-sandbox')      # Chromium refuses root with its sandbox
        # Chromium reads fd 3 and writes fd 4. The shell puts the pipes there (a preexec_fn
        # would run this process's os.register_at_fork hooks, the engine's, in the child),
        # through two spare numbers above both pipes: the pipes may be 3 or 4, and late in a
        # test run any number (fixed spares 100 and 101 once were the pipes themselves).
        spare_r = max(to_browser_r, from_browser_w, 4) + 1
        spare_w = spare_r + 1
        wire = (f'exec {spare_r}<&{to_browser_r} {spare_w}>&{from_browser_w}; '
                f'exec {to_browser_r}<&- {from_browser_w}>&-; '
                f'exec 3<&{spare_r} 4>&{spare_w} {spare_r}<&- {spare_w}>&-; exec "$@"')
        self._log_path = os.path.join(profile_dir, 'chromium-stderr.log')
        os.makedirs(profile_dir, exist_ok=True)
        with open(self._log_path, 'wb') as log:
            self.proc = subprocess.Popen(['bash', '-c', wire, 'bash'] + args,
                                         pass_fds=(to_browser_r, from_browser_w),
                                         stdout=subprocess.DEVNULL, stderr=log)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._answers = {}
        self._cond = threading.Condition()
        self.events = []
        self.errors = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            targets = self.send('Target.getTargets')['targetInfos']
            page = next(t for t in targets if t['type'] == 'page')
            self.session = self.send('Target.attachToTarget', targetId=page['targetId'],
                                     flatten=True)['sessionId']
            for domain in ('Runtime', 'Log', 'Page'):
                self.call(f'{domain}.enable')
        except BaseException:
            self.proc.kill()
            self.proc.wait(10)
            os.close(self._to_browser)
            os.close(self._from_browser)
            raise

    def _read(self):
        buffer = b''
        while True:
            try:
                data = os.read(self._from_browser, 1 << 16)
            except OSError:
                data = b''
            if not data:
                with self._cond:
                    self._answers[None] = 'closed'
                    self._cond.notify_all()
                return
            buffer += data
            while b'\0' in buffer:
                raw, buffer = buffer.split(b'\0', 1)
                message = json.loads(raw)
                with self._cond:
                    if 'id' in message:
                        self._answers[message['id']] = message
                    else:
                        self._event(message)
                    self._cond.notify_all()

    def _event(self, message):
        self.events.append(message)
        method, params = message.get('method'), message.get('params', {})
        if method == 'Runtime.exceptionThrown':
            details = params['exceptionDetails']
            self.errors.append(details.get('exception', {}).get('description')
                               or details.get('text'))
        elif method == 'Runtime.consoleAPICalled' and params.get('type') == 'error':
            self.errors.append(' '.join(str(arg.get('value', arg.get('description', '')))
                                        for arg in params.get('args', [])))
        elif method == 'Log.entryAdded' and params['entry'].get('level') == 'error' \
                and params['entry'].get('source') == 'javascript':
            self.errors.append(params['entry'].get('text'))

    def send(self, method, session=None, timeout=60, **params):
        with self._cond:
            self._next_id += 1
            number = self._next_id
        message = {'id': number, 'method': method, 'params': params}
        if session:
            message['sessionId'] = session
        os.write(self._to_browser, json.dumps(message).encode() + b'\0')
        deadline = time.monotonic() + timeout
        with self._cond:
            while number not in self._answers:
                if None in self._answers:
                    raise RuntimeError(f'Chromium closed its pipe before answering {method} '
                                       f'(exit status {self.proc.poll()}){self._stderr_tail()}')
                if not self._cond.wait(deadline - time.monotonic()):
                    raise RuntimeError(f'Chromium did not answer {method} in {timeout} s '
                                       f'(exit status {self.proc.poll()}){self._stderr_tail()}')
            answer = self._answers.pop(number)
        if 'error' in answer:
            raise RuntimeError(f'{method}: {answer["error"]}')
        return answer.get('result', {})

    def _stderr_tail(self):
        try:
            with open(self._log_path, 'rb') as log:
                tail = log.read()[-2000:].decode(errors='replace').strip()
        except OSError:
            return ''
        return f'; its stderr ends with:\n{tail}' if tail else ''

    def call(self, method, **params):
        """A command to the page."""
        return self.send(method, session=self.session, **params)

    def set_cookie(self, url, name, value):
        self.call('Network.setCookie', url=url, name=name, value=value)

    def navigate(self, url):
        self.call('Page.navigate', url=url)

    def evaluate(self, expression):
        result = self.call('Runtime.evaluate', expression=expression, returnByValue=True)
        if 'exceptionDetails' in result:
            raise RuntimeError(f'{expression}: {result["exceptionDetails"]}')
        return result['result'].get('value')

    def wait_for(self, expression, timeout=60, interval=0.2):
        """Poll ``expression`` until it is truthy; returns its value (or None on timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval)
        return None

    def screenshot(self, path):
        data = self.call('Page.captureScreenshot', format='png')['data']
        with open(path, 'wb') as handle:
            handle.write(base64.b64decode(data))

    def close(self):
        try:
            self.send('Browser.close', timeout=10)
        except RuntimeError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._to_browser)
        os.close(self._from_browser)
