// The console's code editor: CodeMirror 6 with the languages of a sandbox's projects. This is
// the one file that build.mjs bundles (esbuild, into dist/editor.js); the page's own modules
// import it as a plain ES module. No eval, no inline script: CodeMirror's styles go into
// constructed style sheets (or <style> elements where those are missing), which the console's
// CSP allows for styles only.
import { EditorState, Compartment } from '@codemirror/state';
import {
  EditorView, keymap, lineNumbers, highlightActiveLineGutter, highlightSpecialChars,
  drawSelection, dropCursor, rectangularSelection, crosshairCursor, highlightActiveLine,
} from '@codemirror/view';
import { defaultKeymap, history, historyKeymap, indentWithTab } from '@codemirror/commands';
import {
  indentOnInput, syntaxHighlighting, defaultHighlightStyle, bracketMatching, foldGutter,
  foldKeymap,
} from '@codemirror/language';
import { searchKeymap, highlightSelectionMatches } from '@codemirror/search';
import {
  autocompletion, completionKeymap, closeBrackets, closeBracketsKeymap,
} from '@codemirror/autocomplete';
import { javascript } from '@codemirror/lang-javascript';
import { python } from '@codemirror/lang-python';
import { json } from '@codemirror/lang-json';
import { css } from '@codemirror/lang-css';
import { html } from '@codemirror/lang-html';
import { markdown } from '@codemirror/lang-markdown';

/** The language support for a file name, and its display name; null for plain text. */
export function languageFor(name) {
  const ext = (/\.([A-Za-z0-9]+)$/.exec(name || '') || [])[1];
  switch ((ext || '').toLowerCase()) {
    case 'js': case 'mjs': case 'cjs': return { label: 'JavaScript', support: javascript() };
    case 'jsx': return { label: 'JavaScript (JSX)', support: javascript({ jsx: true }) };
    case 'ts': case 'mts': case 'cts': return { label: 'TypeScript', support: javascript({ typescript: true }) };
    case 'tsx': return { label: 'TypeScript (TSX)', support: javascript({ jsx: true, typescript: true }) };
    case 'py': case 'pyi': return { label: 'Python', support: python() };
    case 'json': return { label: 'JSON', support: json() };
    case 'css': return { label: 'CSS', support: css() };
    case 'html': case 'htm': return { label: 'HTML', support: html() };
    case 'md': case 'markdown': return { label: 'Markdown', support: markdown() };
    default: return { label: 'Plain text', support: [] };
  }
}

const theme = EditorView.theme({
  '&': { height: '100%', fontSize: '13.5px', backgroundColor: '#fff' },
  '.cm-scroller': { fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace', lineHeight: '1.45' },
  '.cm-gutters': { backgroundColor: '#f9fafb', borderRight: '1px solid #e5e7eb', color: '#6b7280' },
  '&.cm-focused': { outline: 'none' },
});

/**
 * Creates an editor in `parent`. `onChange()` is called after every edit of the text,
 * `onSave()` on Ctrl/Cmd-S. Returns a small handle; the page never touches CodeMirror itself.
 */
export function createEditor(parent, { onChange, onSave, label } = {}) {
  const readOnly = new Compartment();
  const extensions = (name, ro) => [
    lineNumbers(),
    highlightActiveLineGutter(),
    highlightSpecialChars(),
    history(),
    foldGutter(),
    drawSelection(),
    dropCursor(),
    EditorState.allowMultipleSelections.of(true),
    indentOnInput(),
    syntaxHighlighting(defaultHighlightStyle, { fallback: true }),
    bracketMatching(),
    closeBrackets(),
    autocompletion(),
    rectangularSelection(),
    crosshairCursor(),
    highlightActiveLine(),
    highlightSelectionMatches(),
    keymap.of([
      { key: 'Mod-s', preventDefault: true, run: () => { if (onSave) onSave(); return true; } },
      ...closeBracketsKeymap,
      ...defaultKeymap,
      ...searchKeymap,
      ...historyKeymap,
      ...foldKeymap,
      ...completionKeymap,
      indentWithTab,
    ]),
    languageFor(name).support,
    readOnly.of([EditorState.readOnly.of(ro), EditorView.editable.of(!ro)]),
    EditorView.contentAttributes.of({ 'aria-label': label || 'file editor' }),
    EditorView.updateListener.of((u) => { if (u.docChanged && onChange) onChange(); }),
    theme,
  ];
  const view = new EditorView({ parent, state: EditorState.create({ doc: '', extensions: extensions('', true) }) });

  return {
    /** Shows `text` as the file `name` (language from its extension), with a fresh history. */
    open(name, text, { readOnly: ro = false } = {}) {
      view.setState(EditorState.create({ doc: text, extensions: extensions(name, ro) }));
      view.requestMeasure();
      return languageFor(name).label;
    },
    /** Replaces the whole text (a change on disk), keeping the cursor where it can. */
    replace(text) {
      const head = Math.min(view.state.selection.main.head, text.length);
      view.dispatch({ changes: { from: 0, to: view.state.doc.length, insert: text }, selection: { anchor: head } });
    },
    text() {
      return view.state.doc.toString();
    },
    setReadOnly(ro) {
      view.dispatch({ effects: readOnly.reconfigure([EditorState.readOnly.of(ro), EditorView.editable.of(!ro)]) });
    },
    focus() {
      view.focus();
    },
    view,
  };
}
