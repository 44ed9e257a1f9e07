//! The local language model's memory within a call: a reply reads only what
//! is new in the prompt, also after a reply that was thrown away.

mod common;

use tokio_util::sync::CancellationToken;
use voxgate_agents::llm::{ChatMessage, Generation, LocalLlm, Role};

/// Greedy, so that two conversations given the same prompts say the same.
const GREEDY: Generation = Generation { max_tokens: 16, temperature: 0.0, top_p: 1.0 };
const PROMPT: &str = "You are the receptionist of Luigi's, an Italian restaurant in the old town. We are open every day from nine in the morning to ten at night, and we take bookings for up to twelve people. Always answer in English, in one short sentence.";

#[test]
fn a_reply_thrown_away_is_undone_without_reading_the_call_again() {
    let llm = LocalLlm::load(&common::models().llm).expect("the local LLM loads");
    let never = CancellationToken::new();
    let mut history = vec![ChatMessage::new(Role::System, PROMPT), ChatMessage::new(Role::User, "Hello, who is this?")];

    // Two conversations hear the same first turn.
    let (mut guessed, mut straight) = (llm.conversation(1), llm.conversation(1));
    let first = llm.generate_with(&mut guessed, &history, GREEDY, &never, |_| {}).unwrap();
    assert_eq!(first.read, llm.prompt_tokens(&history).unwrap(), "the first reply reads the whole prompt");
    assert_eq!(llm.generate_with(&mut straight, &history, GREEDY, &never, |_| {}).unwrap(), first);
    history.push(ChatMessage::new(Role::Assistant, first.text.clone()));

    // One of them answers a guess at the caller's next words, cut short
    // when the caller goes on.
    let mut guess = history.clone();
    guess.push(ChatMessage::new(Role::User, "Do you have a table"));
    let cut = CancellationToken::new();
    let dropped = llm.generate_with(&mut guessed, &guess, GREEDY, &cut, |_| cut.cancel()).unwrap();
    assert!(dropped.tokens < GREEDY.max_tokens, "{dropped:?}");

    history.push(ChatMessage::new(Role::User, "Do you have a table for two people tonight?"));
    let after_guess = llm.generate_with(&mut guessed, &history, GREEDY, &never, |_| {}).unwrap();
    let without_guess = llm.generate_with(&mut straight, &history, GREEDY, &never, |_| {}).unwrap();
    // The thrown-away reply left no trace: same tokens read, same answer.
    assert_eq!(after_guess, without_guess);
    let whole = llm.prompt_tokens(&history).unwrap();
    assert!(after_guess.read * 4 < whole, "read {} of a {whole}-token prompt", after_guess.read);
}
