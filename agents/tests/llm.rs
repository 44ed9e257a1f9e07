//! The local language model's memory within a call: a reply reads only what
//! is new in the prompt, also after a reply that was thrown away and once
//! the call has outgrown the context.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use voxgate_agents::llm::{generate_sliced, prefill, ChatMessage, Generation, LocalConversation, LocalLlm, Role};
use voxgate_agents::pool::{InferencePool, Urgency};

/// Greedy, so that two conversations given the same prompts say the same.
const GREEDY: Generation = Generation { max_tokens: 16, temperature: 0.0, top_p: 1.0 };
const PROMPT: &str = "You are the receptionist of Luigi's, an Italian restaurant in the old town. We are open every day from nine in the morning to ten at night, and we take bookings for up to twelve people. Always answer in English, in one short sentence.";

/// Two conversations that heard the same first turn, and that turn.
fn two_after_the_first_turn(llm: &LocalLlm) -> (LocalConversation, LocalConversation, Vec<ChatMessage>) {
    let never = CancellationToken::new();
    let mut history = vec![ChatMessage::new(Role::System, PROMPT), ChatMessage::new(Role::User, "Hello, who is this?")];
    let (mut one, mut other) = (llm.conversation(1), llm.conversation(1));
    let first = llm.generate_with(&mut one, &history, GREEDY, &never, |_| {}).unwrap();
    assert_eq!(first.read, llm.prompt_tokens(&history).unwrap(), "the first reply reads the whole prompt");
    assert_eq!(llm.generate_with(&mut other, &history, GREEDY, &never, |_| {}).unwrap(), first);
    history.push(ChatMessage::new(Role::Assistant, first.text));
    (one, other, history)
}

#[test]
fn a_reply_thrown_away_is_undone_without_reading_the_call_again() {
    let llm = LocalLlm::load(&common::models().llm).expect("the local LLM loads");
    let never = CancellationToken::new();
    let (mut guessed, mut straight, mut history) = two_after_the_first_turn(&llm);

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

#[test]
fn a_call_longer_than_the_context_lets_its_oldest_exchanges_go_and_reads_only_its_new_words() {
    let llm = LocalLlm::load(&common::models().llm).expect("the local LLM loads");
    let never = CancellationToken::new();
    let mut conv = llm.conversation(3);
    let mut history = vec![ChatMessage::new(Role::System, PROMPT), ChatMessage::new(Role::Assistant, "Luigi's, good evening, how can I help?")];
    let long_question = |turn: usize| {
        format!(
            "This is question number {turn} of my long list: we are a group of {} friends coming from the north of the country by train, \
             arriving late in the evening after a long day of walking in the hills, and some of us cannot eat gluten or dairy. \
             Could you tell me what you would suggest for us, and whether the kitchen is still open at that hour?",
            turn + 2
        )
    };
    let mut start = Vec::new();
    let (mut turns_past_the_context, mut turn) = (0, 0);
    while turns_past_the_context < 3 {
        turn += 1;
        assert!(turn <= 60, "the conversation never outgrew the context");
        history.push(ChatMessage::new(Role::User, long_question(turn)));
        let whole = llm.prompt_tokens(&history).unwrap();
        let past = whole + GREEDY.max_tokens > llm.context();
        let asked = std::time::Instant::now();
        let first_token = std::cell::Cell::new(None);
        let reply = llm.generate_with(&mut conv, &history, GREEDY, &never, |_| first_token.set(first_token.get().or(Some(asked.elapsed())))).unwrap();
        eprintln!("turn {turn}: prompt {whole} tokens, read {}, held {}, first text after {:?}", reply.read, conv.tokens().len(), first_token.get());
        assert!(!reply.text.trim().is_empty(), "turn {turn}: no answer");
        if turn == 1 {
            start = conv.tokens()[..40].to_vec();
        } else {
            // Only the new question and the template around it, never the
            // call again, also on the turns whose whole history no longer
            // fits.
            assert!(reply.read < 160, "turn {turn} read {} tokens (whole prompt {whole})", reply.read);
        }
        assert!(conv.tokens().len() <= llm.context(), "turn {turn}: {} tokens held", conv.tokens().len());
        assert_eq!(conv.tokens()[..40], start[..], "turn {turn}: the system prompt is kept");
        turns_past_the_context += usize::from(past);
        history.push(ChatMessage::new(Role::Assistant, reply.text));
    }
    // What the model still holds is much less than the call: the oldest
    // questions went, in whole exchanges.
    assert!(conv.tokens().len() * 3 < llm.prompt_tokens(&history).unwrap() * 2);
}

#[test]
fn a_reply_that_lost_its_conversation_to_a_newer_one_stops_without_touching_it() {
    let llm = LocalLlm::load(&common::models().llm).expect("the local LLM loads");
    let never = CancellationToken::new();
    let (mut shared, mut straight, mut history) = two_after_the_first_turn(&llm);

    // A guess starts, two tokens in a newer reply takes the conversation.
    let mut guess = history.clone();
    guess.push(ChatMessage::new(Role::User, "Do you have"));
    let mut old = llm.start(&mut shared, &guess, GREEDY).unwrap();
    assert!(!llm.step(&mut shared, &mut old, 2, &never, |_| {}).unwrap(), "two tokens do not end the reply");
    history.push(ChatMessage::new(Role::User, "Do you have a table for two people tonight?"));
    let mut new = llm.start(&mut shared, &history, GREEDY).unwrap();

    // The old reply's next step ends it and generates nothing.
    let mut late = String::new();
    assert!(llm.step(&mut shared, &mut old, 8, &never, |t| late.push_str(t)).unwrap(), "the old reply is over");
    assert_eq!((late.as_str(), old.reply().tokens), ("", 2));

    // The new one, stepped a few tokens at a time, says what it would have
    // said alone.
    while !llm.step(&mut shared, &mut new, 3, &never, |_| {}).unwrap() {}
    assert_eq!(new.reply(), llm.generate_with(&mut straight, &history, GREEDY, &never, |_| {}).unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_reply_lets_other_work_through_the_pool_between_its_slices() {
    let llm = Arc::new(LocalLlm::load(&common::models().llm).expect("the local LLM loads"));
    let pool = InferencePool::new(1);
    let conv = Arc::new(Mutex::new(llm.conversation(7)));
    let messages = vec![ChatMessage::new(Role::System, PROMPT), ChatMessage::new(Role::User, "Tell me everything about your menu, dish by dish.")];
    let long = Generation { max_tokens: 64, temperature: 0.0, top_p: 1.0 };
    let pieces = Arc::new(AtomicUsize::new(0));
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let mut first_tx = Some(first_tx);
    let counted = pieces.clone();
    let on_text = move |_: &str| {
        counted.fetch_add(1, Ordering::SeqCst);
        if let Some(tx) = first_tx.take() {
            let _ = tx.send(());
        }
    };
    let generation = {
        let (pool, llm, conv) = (pool.clone(), llm.clone(), conv.clone());
        tokio::spawn(async move { generate_sliced(&pool, &llm, &conv, messages, long, &CancellationToken::new(), || Urgency::Later, None, on_text).await })
    };
    first_rx.await.expect("the reply starts");
    // The only slot is the reply's; a short job queued now runs at the end
    // of the reply's current slice, not of the whole reply.
    let seen = pieces.clone();
    let pieces_when_run = pool.run(Urgency::Later, move || seen.load(Ordering::SeqCst)).await.unwrap();
    let reply = generation.await.unwrap().unwrap();
    assert!(reply.tokens >= 32, "a reply of a few slices: {reply:?}");
    assert!(pieces_when_run < pieces.load(Ordering::SeqCst) / 2, "the job ran after {pieces_when_run} of {} pieces", pieces.load(Ordering::SeqCst));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prompt_read_while_ringing_in_slices_leaves_the_first_turn_only_the_callers_words() {
    let llm = Arc::new(LocalLlm::load(&common::models().llm).expect("the local LLM loads"));
    let pool = InferencePool::new(1);
    let never = CancellationToken::new();
    // Several prefill slices' worth of system prompt.
    let system = ChatMessage::new(Role::System, format!("{PROMPT} {}", "Our menu has pizza, pasta, salads and desserts. ".repeat(12)));
    let read = Arc::new(Mutex::new(llm.conversation(3)));
    prefill(&pool, &llm, &read, vec![system.clone()]).await.unwrap();
    let turn = vec![system, ChatMessage::new(Role::User, "Do you have pizza?")];
    let reply = generate_sliced(&pool, &llm, &read, turn.clone(), GREEDY, &never, Urgency::now, None, |_| {}).await.unwrap();
    let whole = llm.prompt_tokens(&turn).unwrap();
    assert!(whole > 128 && reply.read * 8 < whole, "read {} of a {whole}-token prompt", reply.read);
    // The same words as without the read-ahead.
    let cold = Arc::new(Mutex::new(llm.conversation(3)));
    assert_eq!(generate_sliced(&pool, &llm, &cold, turn, GREEDY, &never, Urgency::now, None, |_| {}).await.unwrap().text, reply.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn replies_of_several_calls_are_read_together_and_each_says_what_it_would_alone() {
    let llm = Arc::new(LocalLlm::load(&common::models().llm).expect("the local LLM loads"));
    let never = CancellationToken::new();
    let long = Generation { max_tokens: 24, temperature: 0.0, top_p: 1.0 };
    // More replies than one pass reads (eight): the rest wait for the next.
    let questions = [
        "Tell me about your menu.",
        "Where exactly are you?",
        "Can I bring my two dogs and a cat?",
        "Do you have a table for two tonight?",
        "What are your opening hours?",
        "Is there parking nearby?",
        "Do you serve vegan food?",
        "How much is a pizza?",
        "Can I book for my birthday?",
        "Do you deliver?",
    ];
    let turn = |q: &str| vec![ChatMessage::new(Role::System, PROMPT), ChatMessage::new(Role::User, q)];
    let alone: Vec<String> = questions.iter().map(|q| llm.generate_with(&mut llm.conversation(5), &turn(q), long, &never, |_| {}).unwrap().text).collect();
    // One slot: while one reply's slice runs the others queue behind it,
    // and the next job reads all of them.
    let pool = InferencePool::new(1);
    let replies: Vec<_> = questions
        .iter()
        .map(|q| {
            let (pool, llm, messages) = (pool.clone(), llm.clone(), turn(q));
            let conv = Arc::new(Mutex::new(llm.conversation(5)));
            tokio::spawn(async move { generate_sliced(&pool, &llm, &conv, messages, long, &CancellationToken::new(), || Urgency::Later, None, |_| {}).await })
        })
        .collect();
    let mut together = Vec::new();
    for r in replies {
        together.push(r.await.unwrap().unwrap().text);
    }
    assert_eq!(together, alone, "read together, each reply says what it says alone");
    let (passes, tokens) = llm.queued_passes();
    assert!(tokens > passes + passes / 2, "{tokens} tokens in {passes} passes: the replies were not read together");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_reply_stops_after_its_current_token_and_goes_on_when_released() {
    let llm = Arc::new(LocalLlm::load(&common::models().llm).expect("the local LLM loads"));
    let pool = InferencePool::new(2);
    let conv = Arc::new(Mutex::new(llm.conversation(7)));
    let messages = vec![ChatMessage::new(Role::System, PROMPT), ChatMessage::new(Role::User, "Tell me everything about your menu, dish by dish.")];
    let long = Generation { max_tokens: 48, temperature: 0.0, top_p: 1.0 };
    let (hold, held) = tokio::sync::watch::channel(true);
    let (text_tx, mut text) = tokio::sync::mpsc::unbounded_channel::<String>();
    let generation = {
        let (pool, llm, conv) = (pool.clone(), llm.clone(), conv.clone());
        let on_text = move |t: &str| {
            let _ = text_tx.send(t.to_string());
        };
        tokio::spawn(async move { generate_sliced(&pool, &llm, &conv, messages, long, &CancellationToken::new(), Urgency::now, Some(held), on_text).await })
    };
    let quiet = std::time::Duration::from_millis(400);
    assert!(tokio::time::timeout(quiet, text.recv()).await.is_err(), "held from the start: nothing is generated");
    hold.send_replace(false);
    text.recv().await.expect("released: the reply starts");
    hold.send_replace(true);
    // The token in progress may still come out, then nothing.
    tokio::time::sleep(quiet).await;
    let mut before = 1;
    while text.try_recv().is_ok() {
        before += 1;
    }
    assert!(tokio::time::timeout(quiet, text.recv()).await.is_err(), "a held reply generates nothing");
    hold.send_replace(false);
    let reply = generation.await.unwrap().unwrap();
    let mut after = 0;
    while text.try_recv().is_ok() {
        after += 1;
    }
    assert!(before <= 8 && after > 0, "released again, the reply goes on ({before} pieces before the hold, {after} after): {reply:?}");
}

#[test]
fn the_callers_words_read_while_they_speak_leave_the_reply_only_the_last_ones() {
    let llm = LocalLlm::load(&common::models().llm).expect("the local LLM loads");
    let never = CancellationToken::new();
    let (mut listened, mut straight, mut history) = two_after_the_first_turn(&llm);

    // Partial transcripts as the caller speaks, the first heard otherwise.
    assert!(llm.listen_ahead(&mut listened, &history, "Do you half").unwrap() > 0);
    assert!(llm.listen_ahead(&mut listened, &history, "Do you have a table for").unwrap() > 0);
    assert_eq!(llm.listen_ahead(&mut listened, &history, "Do you have a table for").unwrap(), 0, "nothing new to read");

    history.push(ChatMessage::new(Role::User, "Do you have a table for two people tonight?"));
    let after_listening = llm.start(&mut listened, &history, GREEDY).unwrap();
    let without = llm.start(&mut straight, &history, GREEDY).unwrap();
    let (a, b) = (after_listening.reply(), without.reply());
    assert_eq!(listened.tokens(), straight.tokens(), "the model has read the same prompt");
    assert!(a.read * 2 < b.read, "read {} of the {} tokens the turn adds", a.read, b.read);
    // (Read in pieces, the numbers differ in their last bits from one read
    // at once, so the sampled words may differ: the same prompt, not the
    // same reply, is what reading ahead keeps.)
    let mut reply = after_listening;
    while !llm.step(&mut listened, &mut reply, 8, &never, |_| {}).unwrap() {}
    assert!(!reply.reply().text.trim().is_empty());
}

#[test]
fn words_read_ahead_that_the_caller_did_not_say_and_a_reply_in_progress_are_left_alone() {
    let llm = LocalLlm::load(&common::models().llm).expect("the local LLM loads");
    let never = CancellationToken::new();
    let (mut listened, mut straight, mut history) = two_after_the_first_turn(&llm);
    // A second turn, so that there is an older state to go back to as well.
    history.push(ChatMessage::new(Role::User, "Where are you?"));
    let second = llm.generate_with(&mut listened, &history, GREEDY, &never, |_| {}).unwrap();
    assert_eq!(llm.generate_with(&mut straight, &history, GREEDY, &never, |_| {}).unwrap(), second);
    history.push(ChatMessage::new(Role::Assistant, second.text));

    assert!(llm.listen_ahead(&mut listened, &history, "Do you have a table").unwrap() > 0);
    // The turn ends on other words: the reply goes back to before the guess
    // (not further: only the turn is read again).
    history.push(ChatMessage::new(Role::User, "Can I bring my dog?"));
    let mut reply = llm.start(&mut listened, &history, GREEDY).unwrap();
    let plain = llm.start(&mut straight, &history, GREEDY).unwrap();
    assert_eq!(listened.tokens(), straight.tokens(), "the guess is gone, the turn read as said");
    assert!(reply.reply().read < plain.reply().read, "read {} tokens, {} without reading ahead", reply.reply().read, plain.reply().read);
    assert!(!llm.step(&mut listened, &mut reply, 2, &never, |_| {}).unwrap(), "two tokens do not end the reply");
    // While it is generated nothing else reads into the conversation.
    let before = listened.tokens().to_vec();
    assert_eq!(llm.listen_ahead(&mut listened, &history, "And what about").unwrap(), 0);
    assert_eq!(listened.tokens(), &before[..]);
    while !llm.step(&mut listened, &mut reply, 4, &never, |_| {}).unwrap() {}
    assert!(reply.reply().tokens > 2, "the reply went on: {:?}", reply.reply());
    // Once it is over, the caller's next words are read ahead again, after it.
    history.push(ChatMessage::new(Role::Assistant, reply.reply().text));
    let after_reply = listened.tokens().to_vec();
    assert!(llm.listen_ahead(&mut listened, &history, "And what about").unwrap() > 0);
    assert!(listened.tokens().starts_with(&after_reply), "read on from the reply, not again");
}
