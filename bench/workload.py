"""The coding-agent workload the multi-agent benchmark replays.

Each agent has a long system prompt: shared coding-agent instructions (like the
ones Claude Code or Aider send) followed by an agent-specific part (its
repository, its files, its conventions). A first line names the agent and the
run so that no cache, in either server, is reused across benchmark levels or
runs; within a level each agent only ever reuses its own previous turns.
Every turn appends the previous answer and a new user message (a task, often
with a pasted file or tool output).
"""

from __future__ import annotations

SHARED_INSTRUCTIONS = """\
You are an interactive coding agent that helps users with software engineering tasks in their \
repository. Use the instructions below and the tools available to you to assist the user.

# Tone and style
- Be concise, direct and to the point. Answer in fewer than four lines unless the user asks for detail.
- Do not add preamble or postamble such as "Here is the code" or "Let me know if you need anything".
- When you run a non-trivial command, explain what it does and why you are running it.
- Use GitHub-flavoured Markdown. Code goes in fenced blocks with a language tag.
- Never invent file paths, APIs or test results. If you are unsure, read the file or run the command.

# Proactiveness
You may be proactive, but only when the user asks you to do something. Strike a balance between doing \
the right thing when asked, including follow-up actions, and not surprising the user with actions you \
take without asking. If the user asks how to approach something, answer the question first; do not \
immediately start editing files.

# Following conventions
When making changes to files, first understand the file's code conventions. Mimic code style, use \
existing libraries and utilities, and follow existing patterns.
- Never assume that a given library is available, even if it is well known. Check that the codebase \
already uses it: look at neighbouring files, or at package.json, pyproject.toml, Cargo.toml or go.mod.
- When you create a new component, first look at existing components to see how they are written; \
consider framework choice, naming conventions, typing, and other conventions.
- When you edit a piece of code, first look at the surrounding context (especially its imports) to \
understand the choice of frameworks and libraries, then make the change in the most idiomatic way.
- Always follow security best practices. Never introduce code that exposes or logs secrets and keys. \
Never commit secrets or keys to the repository.
- Do not add comments to the code you write unless the user asks, or the code is complex and needs \
context.

# Doing tasks
The user will primarily request you to perform software engineering tasks: solving bugs, adding new \
functionality, refactoring code, explaining code, and more. For these tasks:
1. Use the search tools to understand the codebase and the user's query. Search extensively, both in \
parallel and sequentially.
2. Implement the solution using all tools available to you.
3. Verify the solution with tests if possible. Never assume a specific test framework or test script: \
check the README or search the codebase to determine the testing approach.
4. When you have completed a task, run the lint and type-check commands (for example `make lint`, \
`ruff check`, `mypy`, `npm run typecheck`) if they were provided, to ensure your code is correct.
Never commit changes unless the user explicitly asks you to.

# Tool usage policy
- Prefer the dedicated file tools over shell commands for reading and editing files.
- You can call multiple tools in a single response. When several independent pieces of information \
are needed, batch the tool calls together for optimal performance.
- When a command fails, read the error message carefully before retrying. Do not retry the same \
command more than twice without changing something.
- Long-running commands (servers, watchers) must be started in the background, never in the foreground.

# Code references
When referencing specific functions or pieces of code, include the pattern `file_path:line_number` \
so that the user can easily navigate to the source code location.

# Git
- Before committing, run `git status` and `git diff` to see what will be committed.
- Write commit messages in the imperative mood, with a short summary line of at most 72 characters.
- Never force-push, never rewrite published history, and never skip hooks.

# Testing
- Put new tests next to the existing ones and follow their structure and fixtures.
- A bug fix comes with a test that fails before the fix and passes after it.
- Keep tests deterministic: no sleeps, no network, no dependence on the order in which tests run.
"""

PROJECTS = [
    ("inventory-service", "Python 3.12, FastAPI, SQLAlchemy 2, PostgreSQL, pytest", "src/inventory",
     ["api/routes.py", "api/schemas.py", "db/models.py", "db/session.py", "services/stock.py",
      "services/pricing.py", "workers/reorder.py", "config.py"], "make test", "ruff check . && mypy src"),
    ("web-dashboard", "TypeScript 5, React 18, Vite, Zustand, Vitest, Playwright", "src",
     ["components/Chart.tsx", "components/Table.tsx", "hooks/useQuery.ts", "store/filters.ts",
      "api/client.ts", "pages/Overview.tsx", "pages/Settings.tsx", "utils/format.ts"], "npm test",
     "npm run lint && npm run typecheck"),
    ("log-shipper", "Rust 1.80, tokio, serde, reqwest, tracing", "src",
     ["main.rs", "config.rs", "tail.rs", "batch.rs", "sink/http.rs", "sink/file.rs", "retry.rs",
      "metrics.rs"], "cargo test", "cargo clippy -- -D warnings"),
    ("payments-gateway", "Go 1.23, chi, pgx, testify, golangci-lint", "internal",
     ["api/handlers.go", "api/middleware.go", "ledger/ledger.go", "ledger/store.go", "psp/stripe.go",
      "psp/adyen.go", "idempotency/keys.go", "config/config.go"], "go test ./...", "golangci-lint run"),
    ("ml-pipeline", "Python 3.11, PyTorch 2, Hydra, Weights & Biases, pytest", "pipeline",
     ["data/loader.py", "data/augment.py", "models/encoder.py", "models/heads.py", "train.py",
      "evaluate.py", "callbacks.py", "utils/seed.py"], "pytest -q", "ruff check . && pyright"),
    ("cli-notes", "Python 3.12, Typer, Rich, SQLite, pytest", "notes",
     ["cli.py", "store.py", "search.py", "export/markdown.py", "export/html.py", "sync.py",
      "crypto.py", "config.py"], "pytest", "ruff check ."),
    ("mobile-api", "Kotlin 2, Ktor, Exposed, Koin, JUnit 5", "src/main/kotlin/app",
     ["Application.kt", "routes/Users.kt", "routes/Feed.kt", "db/Tables.kt", "db/Migrations.kt",
      "auth/Jwt.kt", "push/Notifier.kt", "config/Env.kt"], "./gradlew test", "./gradlew ktlintCheck"),
    ("search-indexer", "Java 21, Spring Boot 3, Elasticsearch client, JUnit 5, Testcontainers", "src/main/java/idx",
     ["IndexerApplication.java", "crawl/Fetcher.java", "crawl/Robots.java", "parse/HtmlParser.java",
      "index/Writer.java", "index/Mapping.java", "api/SearchController.java", "config/Props.java"],
     "./mvnw test", "./mvnw spotless:check"),
]

SNIPPETS = [
    '''def reserve_stock(session, sku: str, quantity: int) -> Reservation:
    item = session.get(Item, sku)
    if item is None:
        raise NotFound(sku)
    if item.available < quantity:
        raise InsufficientStock(sku, item.available, quantity)
    item.available -= quantity
    reservation = Reservation(sku=sku, quantity=quantity, expires_at=now() + RESERVATION_TTL)
    session.add(reservation)
    return reservation''',
    '''export function formatBytes(n: number): string {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(1)} ${units[i]}`;
}''',
    '''pub async fn flush(&mut self) -> Result<(), SinkError> {
    if self.buffer.is_empty() {
        return Ok(());
    }
    let body = serde_json::to_vec(&self.buffer)?;
    let resp = self.client.post(&self.url).body(body).send().await?;
    if !resp.status().is_success() {
        return Err(SinkError::Status(resp.status()));
    }
    self.buffer.clear();
    Ok(())
}''',
    '''func (l *Ledger) Transfer(ctx context.Context, from, to string, amount int64) error {
	tx, err := l.db.Begin(ctx)
	if err != nil {
		return err
	}
	if err := l.debit(ctx, tx, from, amount); err != nil {
		return err
	}
	if err := l.credit(ctx, tx, to, amount); err != nil {
		return err
	}
	return tx.Commit(ctx)
}''',
]

TURN_TASKS = [
    "Here is `{file}` from the repository:\n\n```\n{snippet}\n```\n\nExplain what this code does and "
    "point out the most serious bug in it.",
    "Good. Now fix that bug. Show the corrected function only.",
    "Write a unit test for the fix, following the project's testing conventions ({test}).",
    "The linter ({lint}) now reports an unused import in `{file2}`. What is the smallest change that fixes it?",
    "Summarise the changes we made in this session as a commit message.",
]


def system_prompt(agent: int, nonce: str) -> str:
    name, stack, root, files, test, lint = PROJECTS[agent % len(PROJECTS)]
    tree = "\n".join(f"  {root}/{f}" for f in files)
    return (
        f"Agent {agent} of run {nonce}.\n\n{SHARED_INSTRUCTIONS}\n"
        f"# Environment\nWorking directory: /home/dev/{name}\nIs a git repository: yes\nPlatform: linux\n"
        f"Today's date: 2025-06-{(agent % 28) + 1:02d}\n\n"
        f"# Project: {name}\nStack: {stack}.\nRun the tests with `{test}`; lint with `{lint}`.\n"
        f"Repository layout (abridged):\n{tree}\n  tests/\n  README.md\n\n"
        f"# Project conventions\n- Public functions have docstrings or doc comments and type annotations.\n"
        f"- Errors are explicit values or typed exceptions; never swallow an error silently.\n"
        f"- Configuration comes from environment variables read once at startup in "
        f"`{root}/{files[-1]}`.\n- Every change to `{root}/{files[0]}` needs a matching test.\n"
    )


TOOL_DOCS = """\
# Tools
You can call the following tools. Each call is a JSON object with the tool's name and its arguments.

## Read
Reads a file from the local filesystem. Arguments: {"file_path": string (absolute path), "offset": \
integer (line to start from, optional), "limit": integer (number of lines, optional)}. By default it \
reads up to 2000 lines from the start of the file. Lines longer than 2000 characters are truncated. \
Results are returned with line numbers starting at 1. Read a file before you edit it.

## Edit
Performs exact string replacements in a file. Arguments: {"file_path": string, "old_string": string, \
"new_string": string, "replace_all": boolean (optional)}. The edit fails if old_string is not unique \
in the file unless replace_all is true; give more surrounding context to make it unique. Preserve the \
exact indentation of the file.

## Write
Writes a file, overwriting it if it exists. Arguments: {"file_path": string, "content": string}. Prefer \
editing existing files; never create documentation files unless the user asks for them.

## Bash
Runs a shell command in a persistent shell session. Arguments: {"command": string, "timeout": integer \
(milliseconds, optional, at most 600000), "description": string (five to ten words)}. Quote paths \
that contain spaces. Avoid find, grep, cat, head and tail: use the dedicated tools instead. Never use \
interactive flags such as -i. Chain dependent commands with &&.

## Glob
Finds files by name pattern. Arguments: {"pattern": string (for example "**/*.py"), "path": string \
(directory to search, optional)}. Returns matching paths sorted by modification time.

## Grep
Searches file contents with regular expressions. Arguments: {"pattern": string, "path": string \
(optional), "glob": string (optional file filter), "output_mode": "content" | "files_with_matches" | \
"count", "-i": boolean (case insensitive), "-n": boolean (line numbers), "context": integer}. Supports \
full regular expression syntax; literal braces need escaping.

## TodoWrite
Creates and manages a structured task list for the session. Arguments: {"todos": [{"content": string, \
"status": "pending" | "in_progress" | "completed", "activeForm": string}]}. Use it for tasks with \
three or more steps; mark each task completed as soon as it is done, and keep exactly one task in \
progress at a time.

## WebFetch
Fetches a URL and answers a question about its content. Arguments: {"url": string, "prompt": string}. \
HTTP URLs are upgraded to HTTPS. Results may be summarised when the content is very large.
"""


def shared_system_prompt(nonce: str) -> str:
    """One system prompt for every agent (the shared-prefix workload): instructions and
    tool documentation, as Claude Code and most agent frameworks send for every session."""
    return f"Run {nonce}.\n\n{SHARED_INSTRUCTIONS}\n{TOOL_DOCS}"


def project_context(agent: int) -> str:
    """The agent-specific part of system_prompt, as the first user turn's preamble."""
    name, stack, root, files, test, lint = PROJECTS[agent % len(PROJECTS)]
    tree = "\n".join(f"  {root}/{f}" for f in files)
    return (
        f"I am agent {agent}. Working directory: /home/dev/{name}. Project {name}, stack: {stack}. "
        f"Tests: `{test}`; lint: `{lint}`.\nRepository layout (abridged):\n{tree}\n\n"
    )


def user_message(agent: int, turn: int) -> str:
    name, stack, root, files, test, lint = PROJECTS[agent % len(PROJECTS)]
    task = TURN_TASKS[turn % len(TURN_TASKS)]
    return task.format(file=f"{root}/{files[(agent + turn) % len(files)]}", file2=f"{root}/{files[1]}",
                       snippet=SNIPPETS[agent % len(SNIPPETS)], test=test, lint=lint)


LONG_REPLY_PROMPTS = [
    "Write a complete Python implementation of a binary search tree with insert, delete, search, "
    "in-order traversal and balancing, then explain every method in detail.",
    "Write a detailed tutorial on Python decorators with many code examples, from the basics to "
    "decorators with arguments and class decorators.",
    "Implement a small HTTP router in JavaScript with path parameters, middleware and error handling, "
    "and explain each part in detail with examples.",
    "Write a long, detailed explanation of how garbage collection works in Python, with code examples "
    "for reference counting, cycles and the gc module.",
    "Write a complete command-line todo application in Python using argparse and JSON storage, with "
    "add, list, done and delete commands, and explain the code.",
    "Explain, with detailed code examples, how to write unit tests in Python with pytest: fixtures, "
    "parametrisation, mocking and coverage.",
    "Write a detailed guide to SQL joins with example tables and queries for inner, left, right, full "
    "and cross joins, explaining each result.",
    "Implement a LRU cache in Python from scratch with a dictionary and a doubly linked list, then "
    "explain its complexity and show usage examples.",
]


def decode_messages(agent: int) -> list[dict]:
    """A short prompt that asks for a long reply (the decode-throughput phase)."""
    return [
        {"role": "system", "content": "You are a helpful coding assistant. Give long, detailed answers."},
        {"role": "user", "content": LONG_REPLY_PROMPTS[agent % len(LONG_REPLY_PROMPTS)]},
    ]


def long_prompt_messages(tokenizer, target_tokens: int, nonce: str) -> list[dict]:
    """A user message that pastes a long source file: about target_tokens prompt tokens."""
    header = f"Review this file (run {nonce}) and list its three biggest problems.\n\n```python\n"
    body_parts = []
    i = 0
    while True:
        body_parts.append(
            f"def handler_{i}(request, db, cache):\n"
            f"    key = f'item:{{request.args.get(\"id\")}}:{i}'\n"
            f"    value = cache.get(key)\n"
            f"    if value is None:\n"
            f"        value = db.execute('SELECT * FROM items WHERE id = ' + request.args['id']).fetchone()\n"
            f"        cache.set(key, value, ttl={(i * 37) % 600 + 60})\n"
            f"    return {{'item': value, 'handler': {i}}}\n\n"
        )
        i += 1
        if i % 8 == 0:
            messages = [{"role": "user", "content": header + "".join(body_parts) + "```"}]
            n = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
            if n >= target_tokens:
                return messages
