//! The local LLM: a GGUF llama-architecture model (SmolLM2-135M-Instruct by
//! default) run by candle on the CPU (or CUDA with the `cuda` feature).
//!
//! Weights load once per process; each call owns a [`LocalConversation`]
//! holding its own KV cache. A turn whose prompt extends the previous one
//! (the usual case: the history plus one new user line) only prefills the
//! new tokens, so time to first token does not grow with the call. A reply
//! that was thrown away (started on a guess of the caller's words, or cut
//! off) is undone by going back to the state before it, not by reading the
//! whole conversation again. A call that outgrows the context lets go of
//! its oldest exchanges, their keys and values taken out of the cache
//! (`LocalLlm::fit`), so it too goes on reading only its new words.
//! Replies of several calls generated at the same
//! time are read together, one token of each per pass over the weights
//! ([`generate_sliced`]). The forward pass is [`super::llama`]'s.

use std::io::BufReader;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use tokenizers::Tokenizer;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::chat::{ChatMessage, ChatTemplate, Role};
use super::llama::{KvCache, Llama, Read};
use super::{tokenizer, MAX_REPLY_TOKENS};
use crate::error::AgentError;
use crate::pool::{InferencePool, Urgency};

/// Prompt + reply budget. SmolLM2 supports 8k, but prefill cost grows with
/// it and a phone call's memory does not need more.
const DEFAULT_CONTEXT: usize = 2048;
const REPEAT_PENALTY: f32 = 1.1;
/// The longest system prompt the local model keeps (prefill runs at a few
/// hundred tokens a second on two cores, and it happens while ringing).
pub const SYSTEM_PROMPT_TOKENS: usize = 768;
const REPEAT_WINDOW: usize = 64;
/// Tokens a reply generates before it gives its slot on the inference pool
/// to whatever waits (a few hundred milliseconds of work): a long reply
/// never holds a core for seconds while another call's first words, or the
/// synthesis of its own first sentence, wait behind it.
const SLICE_TOKENS: usize = 8;
/// Prompt tokens a prefill reads per pool job: reading is cheaper per token
/// than generating, so a slice of it takes about as long as one of a reply.
const PREFILL_SLICE_TOKENS: usize = SLICE_TOKENS * 4;
/// Tokens one [`LocalLlm::listen_ahead`] reads at most (a pool job of about
/// a slice's length): more means the conversation so far is not read yet,
/// which the prefill or the reply will do.
const LISTEN_TOKENS: usize = PREFILL_SLICE_TOKENS;
/// Replies read in one pass at most (see [`LocalLlm::run_queued`]): more
/// wait for the next job, so that one slice stays a few hundred
/// milliseconds of work.
const MAX_BATCH: usize = 8;

fn inference(e: candle_core::Error) -> AgentError {
    AgentError::Inference(format!("llm: {e}"))
}

pub struct LocalLlm {
    model: Llama,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    stop: Vec<u32>,
    context: usize,
    /// Whether a product may use a second core now (see
    /// [`LocalLlm::with_spare_core`]).
    spare_core: Box<dyn Fn() -> bool + Send + Sync>,
    /// Replies waiting for their next slice (see [`generate_sliced`]).
    queued: Mutex<Vec<Queued>>,
    /// Passes over the weights for queued replies, and the tokens they read.
    passes: AtomicU64,
    pass_tokens: AtomicU64,
}

/// A reply's text callback, boxed so that replies of several calls can wait
/// in one queue.
type OnText = Box<dyn FnMut(&str) + Send>;

/// What a slice leaves: the reply, its callback, and whether it is over.
type Sliced = (Box<Generating>, OnText, bool);

/// What a reply's caller hears of a slice of it.
enum Step {
    /// The slice is over and the reply is back (over, or held).
    Back(Sliced),
    /// The reply went on and is queued for its next slice already (so that
    /// the next job finds every reply of the slice, not only the first one
    /// whose caller came back): it needs a pool job.
    Queued,
}

/// A reply waiting for its next slice: whichever pool job runs first reads
/// the next tokens of every reply waiting, together.
struct Queued {
    conv: Arc<Mutex<LocalConversation>>,
    g: Box<Generating>,
    on_text: OnText,
    cancel: CancellationToken,
    hold: Option<watch::Receiver<bool>>,
    /// How soon its caller needs it, as it was queued (a reply queued
    /// again by its slice keeps it).
    urgency: Urgency,
    tell: mpsc::UnboundedSender<Result<Step, AgentError>>,
}

/// A generated reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub text: String,
    /// Tokens generated.
    pub tokens: usize,
    /// Stopped at the token budget rather than at an end token.
    pub truncated: bool,
    /// Prompt tokens read for this reply; the rest of the prompt was in the
    /// KV cache already.
    pub read: usize,
}

/// A reply being generated: [`LocalLlm::start`] reads the prompt,
/// [`LocalLlm::step`] adds tokens, a few at a time if the caller wants
/// other work to run in between.
pub struct Generating {
    /// The conversation's reply count when this one started.
    owner: u64,
    sampler: LogitsProcessor,
    /// The next token's logits; None once the reply is over.
    logits: Option<Tensor>,
    generated: Vec<u32>,
    text: String,
    budget: usize,
    read: usize,
}

impl Generating {
    /// What has been generated so far.
    pub fn reply(&self) -> Reply {
        Reply { text: self.text.clone(), tokens: self.generated.len(), truncated: self.generated.len() >= self.budget, read: self.read }
    }
}

/// How to sample a reply.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Generation {
    pub max_tokens: usize,
    /// 0 picks the likeliest token every time.
    pub temperature: f64,
    pub top_p: f64,
}

impl Generation {
    /// Short, focused spoken replies.
    pub const AGENT: Generation = Generation { max_tokens: MAX_REPLY_TOKENS, temperature: 0.3, top_p: 0.9 };
}

/// One call's state in the local model: the KV cache and what it holds.
pub struct LocalConversation {
    cache: KvCache,
    /// How many of the tokens the cache holds were read in this state (a
    /// state gone back to leaves later ones in the cache).
    read: usize,
    text: String,
    seed: u64,
    /// The state before the last reply's prompt was read (usable while the
    /// cache still holds it: see [`KvCache::holds`]).
    before_last: Option<Checkpoint>,
    /// Replies started on this conversation (the latest one owns it), and
    /// readers ahead of one (a prefill or a listen-ahead stops when this
    /// moves on).
    replies: u64,
    /// A reply is being generated: nothing else may read into the cache.
    generating: bool,
    /// The state at the start of the caller's turn last read ahead (see
    /// [`LocalLlm::listen_ahead`]): where to go back to when the caller's
    /// words turn out other than read.
    heard: Option<Checkpoint>,
    /// Messages after the system prompt let go of to stay inside the
    /// context, oldest first (see [`LocalLlm::fit`]).
    dropped: usize,
}

#[derive(Clone)]
struct Checkpoint {
    tokens: Vec<u32>,
    text: String,
}

impl LocalLlm {
    pub fn load(path: &Path) -> Result<Self, AgentError> {
        if !path.is_file() {
            return Err(AgentError::Model(format!("LLM model {} not found (run scripts/setup)", path.display())));
        }
        let device = device()?;
        let mut reader = BufReader::new(std::fs::File::open(path)?);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| AgentError::Model(format!("gguf: {e}")))?;
        let tokenizer = tokenizer::from_gguf(&content)?;
        let template_src = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned())
            .ok_or_else(|| AgentError::Model("gguf has no tokenizer.chat_template".into()))?;
        let template = ChatTemplate::new(&template_src)?;
        let mut stop = Vec::new();
        if let Some(id) = content.metadata.get("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok()) {
            stop.push(id);
        }
        for special in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
            if let Some(id) = tokenizer.token_to_id(special) {
                stop.push(id);
            }
        }
        let context = content
            .metadata
            .get("llama.context_length")
            .and_then(|v| v.to_u32().ok())
            .map_or(DEFAULT_CONTEXT, |c| (c as usize).min(DEFAULT_CONTEXT));
        let model = Llama::from_gguf(&content, &mut reader, &device).map_err(|e| AgentError::Model(format!("llm: {e}")))?;
        Ok(LocalLlm { model, tokenizer, template, stop, context, spare_core: Box::new(|| false), queued: Mutex::new(Vec::new()), passes: AtomicU64::new(0), pass_tokens: AtomicU64::new(0) })
    }

    /// Lets the model's products use a second thread while `idle` says the
    /// other core has nothing else to do (asked before each product;
    /// without it, one thread). A second thread nearly halves a lone call's
    /// time per token, but beside other work it would wait for a core
    /// that is taken.
    pub fn with_spare_core(mut self, idle: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.spare_core = Box::new(idle);
        self
    }

    pub fn conversation(&self, seed: u64) -> LocalConversation {
        LocalConversation { cache: KvCache::default(), read: 0, text: String::new(), seed, before_last: None, replies: 0, generating: false, heard: None, dropped: 0 }
    }

    fn count(&self, text: &str) -> Result<usize, AgentError> {
        Ok(self.encode(text)?.len())
    }

    /// The token ids of `text`, without special tokens added.
    fn encode(&self, text: &str) -> Result<Vec<u32>, AgentError> {
        Ok(self.tokenizer.encode(text, false).map_err(|e| AgentError::Inference(e.to_string()))?.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included.
    fn decode(&self, ids: &[u32]) -> Result<String, AgentError> {
        self.tokenizer.decode(ids, false).map_err(|e| AgentError::Inference(e.to_string()))
    }

    /// A system prompt cut to [`SYSTEM_PROMPT_TOKENS`] on a token boundary,
    /// so that a 20,000-character prompt neither overflows the context nor
    /// takes seconds to prefill on a CPU.
    pub fn fit_system_prompt(&self, prompt: &str) -> Result<String, AgentError> {
        let ids = self.encode(prompt)?;
        let budget = SYSTEM_PROMPT_TOKENS.min(self.context / 2);
        if ids.len() <= budget {
            return Ok(prompt.to_string());
        }
        self.decode(&ids[..budget])
    }

    /// `messages` as `conv` reads them, and the prompt they make: without
    /// the oldest exchanges it has let go of. When the prompt and a reply of `budget` tokens would
    /// no longer fit the context, more of the oldest messages go (never the
    /// system prompt, never the last message; whole exchanges, so that what
    /// is kept starts with the caller's words) until the prompt takes at
    /// most half the context, and their keys and values leave the KV cache
    /// ([`Llama::forget`]): the reply then reads only the new words, not
    /// the call again (at a few hundred tokens a second, a full context
    /// read again would be seconds of silence on every later turn), and
    /// the next turns read on from there until the context is full again.
    fn fit(&self, conv: &mut LocalConversation, messages: &[ChatMessage], budget: usize) -> Result<(Vec<ChatMessage>, String), AgentError> {
        let head = messages.iter().take_while(|m| m.role == Role::System).count();
        let mut kept = messages.to_vec();
        let dropped = conv.dropped.min(kept.len().saturating_sub(head + 1));
        kept.drain(head..head + dropped);
        let prompt = self.template.render(&kept)?;
        let tokens = match prompt.strip_prefix(conv.text.as_str()).filter(|_| !conv.text.is_empty()) {
            Some(rest) => conv.read + self.count(rest)?,
            None => self.count(&prompt)?,
        };
        if tokens + budget <= self.context {
            return Ok((kept, prompt));
        }
        let before = self.template.render_with(&kept, false)?;
        let mut more = 0;
        while kept.len() > head + 1 && (kept[head].role != Role::User || self.count(&self.template.render(&kept)?)? > self.context / 2) {
            kept.remove(head);
            more += 1;
        }
        conv.dropped = dropped + more;
        let after = self.template.render_with(&kept, false)?;
        if !self.forget_between(conv, &before, &after)? {
            conv.reset();
        }
        let prompt = self.template.render(&kept)?;
        Ok((kept, prompt))
    }

    /// Takes out of `conv` the text `before` (the conversation's messages
    /// rendered) has and `after` (the same with messages taken out of the
    /// middle) has not, with its tokens: false when the conversation does
    /// not hold that text on token boundaries (it read other words), and
    /// the next reply must read its prompt whole.
    fn forget_between(&self, conv: &mut LocalConversation, before: &str, after: &str) -> Result<bool, AgentError> {
        let Some(gone) = before.len().checked_sub(after.len()).filter(|&g| g > 0) else { return Ok(false) };
        let common = before.bytes().zip(after.bytes()).take_while(|(a, b)| a == b).count();
        // Where each token's text ends. The cut starts at the last token
        // boundary inside the text both renderings start with (taking
        // `gone` bytes out from any point there leaves `after`), and must
        // end on one too.
        let tokens = conv.tokens().to_vec();
        let mut ends = Vec::with_capacity(tokens.len() + 1);
        ends.push(0);
        for t in &tokens {
            ends.push(ends.last().copied().unwrap_or(0) + self.decode(&[*t])?.len());
        }
        let Some(from) = ends.iter().rposition(|&e| e <= common) else { return Ok(false) };
        let (cut, cut_end) = (ends[from], ends[from] + gone);
        let Some(to) = ends.iter().position(|&e| e == cut_end) else { return Ok(false) };
        let held = conv.text.get(..cut_end);
        if held.is_none() || held != before.get(..cut_end) || held != Some(self.decode(&tokens[..to])?.as_str()) || conv.text.get(..cut) != Some(self.decode(&tokens[..from])?.as_str()) {
            return Ok(false);
        }
        self.model.forget(&mut conv.cache, from, to).map_err(inference)?;
        conv.read -= to - from;
        conv.text.replace_range(cut..cut_end, "");
        // The states kept to go back to hold the forgotten words.
        (conv.before_last, conv.heard) = (None, None);
        Ok(true)
    }

    /// The tokens to read ahead of a call's first turn (see [`prefill`]),
    /// with the conversation reset for them; None when there is nothing
    /// worth reading, it does not fit, or a reply has started already.
    fn begin_prefill(&self, conv: &mut LocalConversation, messages: &[ChatMessage]) -> Result<Option<(String, Vec<u32>)>, AgentError> {
        if conv.replies > 0 {
            return Ok(None);
        }
        let prompt = self.template.render_with(messages, false)?;
        let tokens = self.encode(&prompt)?;
        if tokens.is_empty() || tokens.len() + MAX_REPLY_TOKENS > self.context {
            return Ok(None);
        }
        conv.reset();
        Ok(Some((prompt, tokens)))
    }

    /// Reads `tokens` (the start of `prompt`'s) past those `conv` holds, and
    /// records the text they are, so that a reply starting before the
    /// prefill is over reads only the rest.
    fn read_ahead(&self, conv: &mut LocalConversation, prompt: &str, tokens: &[u32]) -> Result<(), AgentError> {
        let Some(new) = tokens.get(conv.read..).filter(|t| !t.is_empty()) else { return Ok(()) };
        self.forward(conv, new)?;
        let text = self.decode(tokens)?;
        // A cut inside a character decodes to a replacement character: the
        // text is then not known until the next slice.
        conv.text = if prompt.starts_with(&text) { text } else { String::new() };
        Ok(())
    }

    /// Tokens of the prompt `messages` make (for usage reports and to
    /// check they fit the context).
    pub fn prompt_tokens(&self, messages: &[ChatMessage]) -> Result<usize, AgentError> {
        self.count(&self.template.render(messages)?)
    }

    /// Passes over the weights that read replies' queued slices, and the
    /// tokens those passes read (more tokens than passes: replies of several
    /// calls were read together).
    pub fn queued_passes(&self) -> (u64, u64) {
        (self.passes.load(Ordering::Relaxed), self.pass_tokens.load(Ordering::Relaxed))
    }

    /// The context length in tokens (prompt and reply together).
    pub fn context(&self) -> usize {
        self.context
    }

    /// Generates the assistant's reply to `messages`, calling `on_text` with
    /// each new piece of text. Stops at an end token, at `opts.max_tokens`
    /// or when `cancel` is set. Blocking: run it on the inference pool (or
    /// use [`generate_sliced`], which lets other calls' work in between).
    pub fn generate_with(
        &self,
        conv: &mut LocalConversation,
        messages: &[ChatMessage],
        opts: Generation,
        cancel: &CancellationToken,
        mut on_text: impl FnMut(&str),
    ) -> Result<Reply, AgentError> {
        let mut g = self.start(conv, messages, opts)?;
        while !self.step(conv, &mut g, usize::MAX, cancel, &mut on_text)? {}
        Ok(g.reply())
    }

    /// Reads the prompt `messages` makes (only what the conversation's KV
    /// cache does not hold yet) and returns the reply, ready for
    /// [`step`](Self::step). The conversation belongs to this reply from
    /// now on: an earlier reply's further steps end it.
    pub fn start(&self, conv: &mut LocalConversation, messages: &[ChatMessage], opts: Generation) -> Result<Generating, AgentError> {
        let budget = opts.max_tokens.clamp(1, self.context / 2);
        let (_, prompt) = self.fit(conv, messages, budget)?;
        let extends = |text: &str| !text.is_empty() && prompt.starts_with(text);
        if !extends(&conv.text) {
            // The last reply is not part of this prompt (it was dropped or
            // cut short), or the caller's words read ahead were not what
            // they said: go back to before them if that state still fits.
            match conv.latest_checkpoint(|text| extends(text)) {
                Some(c) => conv.restore(c),
                None => conv.reset(),
            }
        }
        let mut new_tokens = self.encode(&prompt[conv.text.len()..])?;
        if conv.read + new_tokens.len() + budget > self.context {
            if conv.read == 0 {
                return Err(AgentError::Inference("the prompt does not fit the model's context".into()));
            }
            conv.reset();
            new_tokens = self.encode(&prompt)?;
            if new_tokens.len() + budget > self.context {
                return Err(AgentError::Inference("the prompt does not fit the model's context".into()));
            }
        }
        conv.before_last = Some(conv.checkpoint());
        conv.replies += 1;
        let logits = self.forward(conv, &new_tokens)?;
        conv.text = prompt;
        conv.generating = true;
        conv.seed = conv.seed.wrapping_add(1);
        let sampling = if opts.temperature <= 0.0 { Sampling::ArgMax } else { Sampling::TopKThenTopP { k: 40, p: opts.top_p, temperature: opts.temperature } };
        Ok(Generating {
            owner: conv.replies,
            sampler: LogitsProcessor::from_sampling(conv.seed, sampling),
            logits: Some(logits),
            generated: Vec::new(),
            text: String::new(),
            budget,
            read: new_tokens.len(),
        })
    }

    /// Generates up to `tokens` more tokens of `g`, calling `on_text` with
    /// each new piece of text; true once the reply is over (an end token,
    /// the budget, `cancel`, or another reply took the conversation).
    pub fn step(
        &self,
        conv: &mut LocalConversation,
        g: &mut Generating,
        tokens: usize,
        cancel: &CancellationToken,
        mut on_text: impl FnMut(&str),
    ) -> Result<bool, AgentError> {
        for _ in 0..tokens {
            let Some(next) = self.choose(conv, g, cancel, &mut on_text)? else { break };
            g.logits = Some(self.forward(conv, &[next])?);
        }
        Ok(Self::over(conv, g, cancel))
    }

    /// Picks `g`'s next token from its logits and passes on the text it
    /// adds; the token is then to be read. None once the reply is over.
    fn choose(&self, conv: &mut LocalConversation, g: &mut Generating, cancel: &CancellationToken, on_text: &mut impl FnMut(&str)) -> Result<Option<u32>, AgentError> {
        if conv.replies != g.owner {
            g.logits = None;
        }
        let Some(logits) = g.logits.take() else { return Ok(None) };
        if g.generated.len() >= g.budget || cancel.is_cancelled() {
            return Ok(None);
        }
        let start = g.generated.len().saturating_sub(REPEAT_WINDOW);
        let penalised = candle_transformers::utils::apply_repeat_penalty(&logits, REPEAT_PENALTY, &g.generated[start..]).map_err(inference)?;
        let next = g.sampler.sample(&penalised).map_err(inference)?;
        if self.stop.contains(&next) {
            return Ok(None);
        }
        g.generated.push(next);
        let text = self.decode(&g.generated)?;
        // Hold back an incomplete UTF-8 sequence until its next byte.
        if !text.ends_with('\u{FFFD}') && text.len() > g.text.len() {
            let new = &text[g.text.len()..];
            on_text(new);
            conv.text.push_str(new);
            g.text = text;
        }
        Ok(Some(next))
    }

    /// The reply is over (an end token, the budget, `cancel`, or another
    /// reply took the conversation); the conversation is then free.
    fn over(conv: &mut LocalConversation, g: &Generating, cancel: &CancellationToken) -> bool {
        let over = g.logits.is_none() || g.generated.len() >= g.budget || cancel.is_cancelled();
        if over {
            Self::let_go(conv, g);
        }
        over
    }

    /// The conversation is free for another reply, unless a later one has
    /// taken it already.
    fn let_go(conv: &mut LocalConversation, g: &Generating) {
        if conv.replies == g.owner {
            conv.generating = false;
        }
    }

    /// Runs the next slice of the replies queued (see [`generate_sliced`]),
    /// up to [`MAX_BATCH`] of them; `give_way(u)`: a job more urgent than
    /// work of urgency `u` waits.
    fn run_queued(&self, give_way: &dyn Fn(Urgency) -> bool) {
        let mut round: Vec<Queued> = Vec::new();
        let mut rest = Vec::new();
        for q in std::mem::take(&mut *self.queued.lock().unwrap_or_else(|p| p.into_inner())) {
            // Two replies of one conversation (one of them replaced, ending)
            // cannot both hold it: the later one waits, as do those past
            // the most one pass reads.
            if round.len() == MAX_BATCH || round.iter().any(|r| Arc::ptr_eq(&r.conv, &q.conv)) {
                rest.push(q);
            } else {
                round.push(q);
            }
        }
        // Back in the queue, each with a job of its own to come.
        self.requeue(rest);
        if !round.is_empty() {
            self.slice_together(round, give_way);
        }
    }

    /// Puts `replies` back in the queue, then tells their callers so that
    /// each queues a pool job for it (the jobs that took them are over).
    fn requeue(&self, replies: Vec<Queued>) {
        let tells: Vec<_> = replies.iter().map(|r| r.tell.clone()).collect();
        self.queued.lock().unwrap_or_else(|p| p.into_inner()).extend(replies);
        for tell in tells {
            let _ = tell.send(Ok(Step::Queued));
        }
    }

    /// Up to [`SLICE_TOKENS`] tokens of each of `replies`, one token of each
    /// per forward pass ([`Llama::forward_batch`]): the weights are read
    /// from memory once for all of them. A reply whose caller holds it, or
    /// that ends, leaves the pass; each is handed back when its slice is
    /// over. A pass of several replies takes longer than one's, so the
    /// slice ends early, after any pass, when `give_way` says that a job due
    /// before the most urgent of them waits for the core.
    fn slice_together(&self, mut replies: Vec<Queued>, give_way: &dyn Fn(Urgency) -> bool) {
        // Locked in one order (by address) whichever job takes them, so two
        // jobs never wait for each other's conversations.
        replies.sort_by_key(|r| Arc::as_ptr(&r.conv) as usize);
        let shared: Vec<_> = replies.iter().map(|r| r.conv.clone()).collect();
        let mut convs: Vec<_> = shared.iter().map(|c| c.lock().unwrap_or_else(|p| p.into_inner())).collect();
        let most_urgent = replies.iter().map(|r| r.urgency).min().unwrap_or(Urgency::Later);
        let mut active = vec![true; replies.len()];
        let mut result: Result<(), AgentError> = Ok(());
        let (started, mut passes, mut tokens) = (std::time::Instant::now(), 0, 0);
        for _ in 0..SLICE_TOKENS {
            let mut next = Vec::new();
            for (i, r) in replies.iter_mut().enumerate() {
                if !active[i] {
                    continue;
                }
                match self.choose(&mut convs[i], &mut r.g, &r.cancel, &mut r.on_text) {
                    Ok(Some(token)) => next.push((i, token)),
                    Ok(None) => active[i] = false,
                    Err(e) => result = Err(e),
                }
            }
            if next.is_empty() || result.is_err() {
                break;
            }
            let mut picks = next.iter().peekable();
            let mut reads = Vec::with_capacity(next.len());
            for (i, conv) in convs.iter_mut().enumerate() {
                if let Some(&(_, token)) = picks.next_if(|(j, _)| *j == i) {
                    let pos = conv.read;
                    reads.push(Read { cache: &mut conv.cache, pos, token });
                }
            }
            match self.model.forward_batch(&mut reads, &*self.spare_core) {
                Ok(logits) => {
                    self.passes.fetch_add(1, Ordering::Relaxed);
                    self.pass_tokens.fetch_add(logits.len() as u64, Ordering::Relaxed);
                    (passes, tokens) = (passes + 1, tokens + logits.len());
                    for (&(i, _), logits) in next.iter().zip(logits) {
                        convs[i].read += 1;
                        replies[i].g.logits = Some(logits);
                        if held(&replies[i].hold) {
                            active[i] = false;
                        }
                    }
                }
                Err(e) => {
                    result = Err(inference(e));
                    break;
                }
            }
            if give_way(most_urgent) {
                break;
            }
        }
        tracing::debug!(replies = replies.len(), passes, tokens, elapsed_ms = started.elapsed().as_millis() as u64, "replies' slice read together");
        let mut going_on = Vec::new();
        for (r, conv) in replies.into_iter().zip(convs.iter_mut()) {
            let step = match &result {
                Ok(()) => {
                    let over = Self::over(conv, &r.g, &r.cancel);
                    if r.tell.is_closed() {
                        // Its caller has gone: the reply ends here.
                        Self::let_go(conv, &r.g);
                        continue;
                    }
                    if !over && !held(&r.hold) {
                        going_on.push(r);
                        continue;
                    }
                    Ok(Step::Back((r.g, r.on_text, over)))
                }
                Err(AgentError::Inference(e)) => Err(AgentError::Inference(e.clone())),
                Err(e) => Err(AgentError::Inference(e.to_string())),
            };
            let _ = r.tell.send(step);
        }
        drop(convs);
        self.requeue(going_on);
    }

    /// Reads the first `words` of the caller's turn, still being spoken (a
    /// partial transcript), after `messages` (the conversation so far): the
    /// reply to the finished turn then has only the last words left to
    /// read. Words read ahead that the caller turns out not to have said are
    /// undone by going back to the start of the turn. Does nothing while a
    /// reply is generated, when the conversation is not read up to the turn
    /// yet (more than [`LISTEN_TOKENS`] missing), or when it would not fit.
    /// Returns the tokens read. Blocking: run it on the inference pool.
    pub fn listen_ahead(&self, conv: &mut LocalConversation, messages: &[ChatMessage], words: &str) -> Result<usize, AgentError> {
        if conv.generating || words.trim().is_empty() {
            return Ok(0);
        }
        let (messages, _) = self.fit(conv, messages, MAX_REPLY_TOKENS)?;
        let turn = self.template.open_user_turn(&messages)?;
        let so_far = format!("{turn}{words}");
        // Read on from here, or from before words read ahead that the
        // caller turned out not to say.
        let back = if so_far.starts_with(&conv.text) {
            None
        } else {
            let Some(c) = conv.latest_checkpoint(|text| so_far.starts_with(text)) else { return Ok(0) };
            Some(c)
        };
        let (from, held) = back.as_ref().map_or((conv.text.len(), conv.read), |c| (c.text.len(), c.tokens.len()));
        // Up to the turn's start, then the words: the state in between is
        // where words heard otherwise later go back to.
        let at_turn = from <= turn.len();
        let to_turn = if at_turn && from < turn.len() { self.encode(&turn[from..])? } else { Vec::new() };
        let new_words = self.encode(if at_turn { words } else { &so_far[from..] })?;
        let read = to_turn.len() + new_words.len();
        if read == 0 || read > LISTEN_TOKENS || held + read + MAX_REPLY_TOKENS > self.context {
            return Ok(0);
        }
        if let Some(c) = back {
            conv.restore(c);
        }
        // A prefill still reading stops: this reads what it would have.
        conv.replies += 1;
        if at_turn {
            if !to_turn.is_empty() {
                self.forward(conv, &to_turn)?;
                conv.text = turn;
            }
            conv.heard = Some(conv.checkpoint());
        }
        if !new_words.is_empty() {
            self.forward(conv, &new_words)?;
        }
        conv.text = so_far;
        Ok(read)
    }

    fn forward(&self, conv: &mut LocalConversation, tokens: &[u32]) -> Result<Tensor, AgentError> {
        let logits = self.model.forward(&mut conv.cache, conv.read, tokens, &*self.spare_core).map_err(inference)?;
        conv.read += tokens.len();
        Ok(logits)
    }
}

/// Generates `conv`'s reply to `messages` on `pool`, [`SLICE_TOKENS`] at a
/// time, each slice a job of its own so that the pool's other work runs in
/// between, each queued with the `urgency` it has then; `on_text` gets each
/// new piece of text as it comes. While `hold` reads true the generation
/// pauses: the slice running ends after its current token and the next
/// waits (the caller needs the cores for something more urgent, such as
/// voicing the text already out).
///
/// The first slice reads the prompt. Each later one waits in the model's
/// queue with those of other calls' replies, and the first of their pool
/// jobs to run reads them all, one token of each per pass over the weights
/// ([`Llama::forward_batch`]): a pass over four calls' tokens takes about
/// twice as long as one over a single token, not four times. The jobs that
/// find the queue emptied end at once. While a caller due before the
/// replies read waits for the core, the slice ends after its current pass.
#[allow(clippy::too_many_arguments)]
pub async fn generate_sliced<F: FnMut(&str) + Send + 'static>(
    pool: &InferencePool,
    llm: &Arc<LocalLlm>,
    conv: &Arc<Mutex<LocalConversation>>,
    messages: Vec<ChatMessage>,
    opts: Generation,
    cancel: &CancellationToken,
    urgency: impl Fn() -> Urgency,
    mut hold: Option<watch::Receiver<bool>>,
    on_text: F,
) -> Result<Reply, AgentError> {
    released(&mut hold).await;
    let (l, c, stop, first_hold) = (llm.clone(), conv.clone(), cancel.clone(), hold.clone());
    let mut on_text: OnText = Box::new(on_text);
    let (mut g, mut on_text, mut done) = pool
        .run(urgency(), move || {
            let mut conv = c.lock().unwrap_or_else(|p| p.into_inner());
            let mut g = Box::new(l.start(&mut conv, &messages, opts)?);
            let mut done = false;
            for _ in 0..SLICE_TOKENS {
                done = l.step(&mut conv, &mut g, 1, &stop, &mut on_text)?;
                if done || held(&first_hold) {
                    break;
                }
            }
            Ok::<Sliced, AgentError>((g, on_text, done))
        })
        .await??;
    let (tell, mut told) = mpsc::unbounded_channel();
    while !done {
        released(&mut hold).await;
        let queued = Queued { conv: conv.clone(), g, on_text, cancel: cancel.clone(), hold: hold.clone(), urgency: urgency(), tell: tell.clone() };
        llm.queued.lock().unwrap_or_else(|p| p.into_inner()).push(queued);
        loop {
            let (l, p) = (llm.clone(), pool.clone());
            pool.run(urgency(), move || l.run_queued(&|u| p.urgent_waiting_before(u))).await?;
            match told.recv().await.ok_or(AgentError::Closed)?? {
                Step::Queued => continue,
                Step::Back(sliced) => {
                    (g, on_text, done) = sliced;
                    break;
                }
            }
        }
    }
    Ok(g.reply())
}

/// The reply's caller holds it now (see [`generate_sliced`]).
fn held(hold: &Option<watch::Receiver<bool>>) -> bool {
    hold.as_ref().is_some_and(|h| *h.borrow())
}

/// Returns once the reply's caller does not hold it (at once without a
/// hold; a dropped sender holds nothing).
async fn released(hold: &mut Option<watch::Receiver<bool>>) {
    if let Some(h) = hold.as_mut() {
        let _ = h.wait_for(|held| !held).await;
    }
}

/// Runs the model over the conversation so far (the system prompt) ahead
/// of time, while the phone rings, so that the first turn only has the
/// caller's words left to read. [`PREFILL_SLICE_TOKENS`] a pool job, queued
/// as work with slack ([`Urgency::Later`]): a long prompt does not hold a
/// core for seconds while other calls wait. A reply that starts meanwhile
/// takes the conversation over (and reads what the prefill had not) and the
/// prefill stops.
pub async fn prefill(pool: &InferencePool, llm: &Arc<LocalLlm>, conv: &Arc<Mutex<LocalConversation>>, messages: Vec<ChatMessage>) -> Result<(), AgentError> {
    let (l, c) = (llm.clone(), conv.clone());
    let begun = pool
        .run(Urgency::Later, move || {
            let mut conv = c.lock().unwrap_or_else(|p| p.into_inner());
            Ok::<_, AgentError>(l.begin_prefill(&mut conv, &messages)?.map(|p| (p, conv.replies)))
        })
        .await??;
    let Some(((prompt, tokens), owner)) = begun else { return Ok(()) };
    let read = Arc::new((prompt, tokens));
    for at in (0..read.1.len()).step_by(PREFILL_SLICE_TOKENS) {
        let (l, c, read) = (llm.clone(), conv.clone(), read.clone());
        let still_ours = pool
            .run(Urgency::Later, move || {
                let mut conv = c.lock().unwrap_or_else(|p| p.into_inner());
                if conv.replies != owner {
                    return Ok(false);
                }
                let (prompt, tokens) = &*read;
                l.read_ahead(&mut conv, prompt, &tokens[..(at + PREFILL_SLICE_TOKENS).min(tokens.len())])?;
                Ok::<_, AgentError>(true)
            })
            .await??;
        if !still_ours {
            break;
        }
    }
    Ok(())
}

impl LocalConversation {
    /// The tokens the model has read (prompts and replies), in order.
    pub fn tokens(&self) -> &[u32] {
        &self.cache.tokens()[..self.read]
    }

    /// Forgets everything read: the next prompt is read in full.
    fn reset(&mut self) {
        self.read = 0;
        self.text.clear();
        self.before_last = None;
        self.heard = None;
    }

    /// Of the states kept to go back to, the one that has read the most,
    /// that `fits` (the text it holds starts the prompt to read) and that
    /// the cache still holds (going back to an earlier state and reading
    /// other words overwrites a later one).
    fn latest_checkpoint(&self, fits: impl Fn(&str) -> bool) -> Option<Checkpoint> {
        [self.before_last.as_ref(), self.heard.as_ref()]
            .into_iter()
            .flatten()
            .filter(|c| fits(&c.text) && self.cache.holds(&c.tokens))
            .max_by_key(|c| c.tokens.len())
            .cloned()
    }

    fn checkpoint(&self) -> Checkpoint {
        Checkpoint { tokens: self.tokens().to_vec(), text: self.text.clone() }
    }

    /// Goes back to `c`, one [`latest_checkpoint`](Self::latest_checkpoint)
    /// found the cache still holds.
    fn restore(&mut self, c: Checkpoint) {
        debug_assert!(self.cache.holds(&c.tokens));
        (self.read, self.text) = (c.tokens.len(), c.text);
    }
}

#[cfg(feature = "cuda")]
fn device() -> Result<Device, AgentError> {
    Device::new_cuda(0).map_err(|e| AgentError::Model(format!("cuda: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn device() -> Result<Device, AgentError> {
    Ok(Device::Cpu)
}
