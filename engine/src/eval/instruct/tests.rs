//! Unit tests of the IFBench verifiers: each covered id gets a response that follows the
//! instruction and one that does not.

use std::collections::HashSet;

use super::*;
use serde_json::json;

fn kwargs(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn check(id: &str, args: &Value, response: &str) -> bool {
    check_instruction(id, &kwargs(args.clone()), response)
        .unwrap_or_else(|error| panic!("{id}: {error}"))
        .unwrap_or_else(|| panic!("{id} is not covered"))
}

const AFRICA: [&str; 54] = [
    "Algeria",
    "Angola",
    "Benin",
    "Botswana",
    "Burkina Faso",
    "Burundi",
    "Cabo Verde",
    "Cameroon",
    "Central African Republic",
    "Chad",
    "Comoros",
    "Democratic Republic of the Congo",
    "Djibouti",
    "Egypt",
    "Equatorial Guinea",
    "Eritrea",
    "Eswatini",
    "Ethiopia",
    "Gabon",
    "Gambia",
    "Ghana",
    "Guinea",
    "Guinea-Bissau",
    "Ivory Coast",
    "Kenya",
    "Lesotho",
    "Liberia",
    "Libya",
    "Madagascar",
    "Malawi",
    "Mali",
    "Mauritania",
    "Mauritius",
    "Morocco",
    "Mozambique",
    "Namibia",
    "Niger",
    "Nigeria",
    "Republic of the Congo",
    "Rwanda",
    "São Tomé and Príncipe",
    "Senegal",
    "Seychelles",
    "Sierra Leone",
    "Somalia",
    "South Africa",
    "South Sudan",
    "Sudan",
    "Tanzania",
    "Togo",
    "Tunisia",
    "Uganda",
    "Zambia",
    "Zimbabwe",
];

const CAPITALS: &str = "Reykjavik, Helsinki, Oslo, Tallinn, Stockholm, Riga, Moscow, \
    Copenhagen, Vilnius, Minsk, Dublin, Berlin, Amsterdam, Warsaw, London, Brussels, Prague, \
    Luxembourg, Paris, Vienna, Bratislava, Budapest, Vaduz, Chișinău, Bern, Ljubljana, Zagreb";

fn csv_rows(header: &str, row: &str, rows: usize, delimiter: &str) -> String {
    let mut text = header.replace(',', delimiter);
    for _ in 0..rows {
        text.push('\n');
        text.push_str(&row.replace(',', delimiter));
    }
    text.push('\n');
    text
}

fn mcq(option_count_of_last: usize) -> String {
    let mut text = String::new();
    for (index, question) in [
        "Who painted it?",
        "Which movement came first?",
        "Which artist founded cubism in Paris?",
        "Which painter is best known for drip paintings made in the 1940s?",
    ]
    .iter()
    .enumerate()
    {
        text.push_str(&format!("Question {}: {question}\n", index + 1));
        let options = if index == 3 { option_count_of_last } else { 5 };
        for letter in ['A', 'B', 'C', 'D', 'E'].iter().take(options) {
            text.push_str(&format!("{letter}) Option {letter}\n"));
        }
        text.push('\n');
    }
    text
}

fn alphabet_story(sentences: usize) -> String {
    ('A'..='Z')
        .take(sentences)
        .map(|letter| format!("{letter}nn walked home."))
        .collect::<Vec<_>>()
        .join(" ")
}

/// (id, kwargs, a response that follows it, one that does not)
fn cases() -> Vec<(&'static str, Value, String, String)> {
    let mut africa_descending: Vec<&str> = AFRICA.to_vec();
    africa_descending.sort_by_key(|name| std::cmp::Reverse(text::ascii_fold(name)));
    let mut africa_misordered = africa_descending.clone();
    africa_misordered.swap(3, 4);
    let city_header = "ID,Country,City,Year,Count";
    let city_row = "1,France,Paris,2020,5";
    let product_header = "ProductID,Category,Brand,Price,Stock";
    let student_header = "\"StudentID\",\"Subject\",\"Grade\",\"Semester\",\"Score\"";
    let keywords = json!({"keyword1": "cloud", "keyword2": "rhythm", "keyword3": "fish",
        "keyword4": "puzzle", "keyword5": "dawn"});
    let special_rows = {
        let mut text = csv_rows(product_header, "1,Tools,Acme,9.99,3", 13, ",");
        text.push_str("14,\"Tools & More\",Acme,9.99,3\n");
        text
    };
    vec![
        (
            "count:conjunctions",
            json!({"small_n": 3.0}),
            "I like tea and coffee, but not juice, so I drink water.".into(),
            "I like tea and coffee.".into(),
        ),
        (
            "count:keywords_multiple",
            keywords.clone(),
            "cloud rhythm rhythm fish fish fish fisherman puzzle puzzle puzzle puzzle puzzle \
             dawn dawn dawn dawn dawn dawn dawn"
                .into(),
            "cloud rhythm rhythm fish fish fish puzzle puzzle puzzle puzzle puzzle dawn dawn \
             dawn dawn dawn dawn dawns"
                .into(),
        ),
        (
            "count:numbers",
            json!({"N": 3.0}),
            "I have 3 cats, 12 dogs and 1,000 fish.".into(),
            "I have 3 cats and 12 dogs.".into(),
        ),
        (
            "count:person_names",
            json!({"N": 2.0}),
            "Emma met Liam in Miami.".into(),
            "Emma went to Miami.".into(),
        ),
        (
            "count:pronouns",
            json!({"N": 3.0}),
            "I told her that they were late.".into(),
            "The cat sat on the mat with me.".into(),
        ),
        (
            "count:punctuation",
            json!({}),
            "Wait?! Really, you came; here: now. Yes! Why?".into(),
            "Wait?! Really, you came; here now.".into(),
        ),
        (
            "count:unique_word_count",
            json!({"N": 5.0}),
            "One two three four five.".into(),
            "One one ONE two two.".into(),
        ),
        (
            "count:word_count_range",
            json!({"min_words": 3.0, "max_words": 5.0}),
            "This has four words.".into(),
            "Too short.".into(),
        ),
        (
            "count:words_japanese",
            json!({"N": 2.0}),
            "I 猫 like 犬 very 魚".into(),
            "I like cats a lot".into(),
        ),
        (
            "custom:character_reverse",
            json!({}),
            "elgae dlab ehT".into(),
            "The bald eagle".into(),
        ),
        (
            "custom:csv_city",
            json!({}),
            csv_rows(city_header, city_row, 7, ","),
            csv_rows(city_header, city_row, 6, ","),
        ),
        (
            "custom:csv_quotes",
            json!({}),
            csv_rows(
                student_header,
                "\"1\",\"Math\",\"A\",\"Fall\",\"95\"",
                3,
                "\t",
            ),
            csv_rows(student_header, "\"1\",\"Math\",A,\"Fall\",\"95\"", 3, "\t"),
        ),
        (
            "custom:csv_special_character",
            json!({}),
            special_rows,
            csv_rows(product_header, "1,Tools,Acme,9.99,3", 14, ","),
        ),
        (
            "custom:date_format_list",
            json!({}),
            "1796-04-12, 1805-12-02, 1815-06-18".into(),
            "1805-12-02, 1805-02-30".into(),
        ),
        (
            "custom:european_capitals_sort",
            json!({}),
            CAPITALS.into(),
            CAPITALS.replace("Oslo, Tallinn", "Tallinn, Oslo"),
        ),
        ("custom:mcq_count_length", json!({}), mcq(5), mcq(4)),
        (
            "custom:multiples",
            json!({}),
            "14, 21, 28, 35, 42, 49".into(),
            "7, 14, 21, 28, 35, 42, 49".into(),
        ),
        (
            "custom:reverse_newline",
            json!({}),
            africa_descending.join("\n"),
            africa_misordered.join("\n"),
        ),
        (
            "custom:sentence_alphabet",
            json!({}),
            alphabet_story(26),
            alphabet_story(25),
        ),
        (
            "custom:word_reverse",
            json!({}),
            "eagle bald the is It".into(),
            "It is the bald eagle.".into(),
        ),
        (
            "format:emoji",
            json!({}),
            "I love sun 🌞. Rain is fine too 🌧️!".into(),
            "I love sun 🌞. Rain is fine too!".into(),
        ),
        (
            "format:line_indent",
            json!({}),
            "a\n  b\n    c".into(),
            "a\n  b\n  c".into(),
        ),
        (
            "format:list",
            json!({"sep": "SEPARATOR"}),
            "SEPARATOR apples\nSEPARATOR pears".into(),
            "- apples\n- pears".into(),
        ),
        (
            "format:list",
            json!({"sep": "-"}),
            "Fruit - apples - pears".into(),
            "A well-known, state-of-the-art answer.".into(),
        ),
        (
            "format:newline",
            json!({}),
            "Hello\nworld\nagain.".into(),
            "Hello world\nagain".into(),
        ),
        (
            "format:no_bullets_bullets",
            json!({}),
            "Cats are great. Dogs are too.\n* one\n* two".into(),
            "Cats are great.\n* one\n* two".into(),
        ),
        (
            "format:no_whitespace",
            json!({}),
            "NoSpacesHere.".into(),
            "Some space.".into(),
        ),
        (
            "format:options",
            json!({"options": "yes/no/maybe"}),
            "Maybe.".into(),
            "Maybe, it depends.".into(),
        ),
        (
            "format:options",
            json!({"options": "a), b), c), d)"}),
            "b)".into(),
            "b) Inadmissible".into(),
        ),
        (
            "format:options",
            json!({"options": "I know or I don't know"}),
            "I don't know".into(),
            "I think so".into(),
        ),
        (
            "format:output_template",
            json!({}),
            "My Answer: x My Conclusion: y Future Outlook: z".into(),
            "My Answer: x Future Outlook: z".into(),
        ),
        (
            "format:parentheses",
            json!({}),
            "(a [b {c (d [e] d) c} b] a)".into(),
            "(a [b {c (d) c} b] a)".into(),
        ),
        (
            "format:quote_unquote",
            json!({}),
            "He said \"hello\" which means hi.".into(),
            "He said \"hello\" \"bye\"".into(),
        ),
        (
            "format:quotes",
            json!({}),
            "He said \"she said 'they said \"go\" today' loudly\" ok".into(),
            "He said \"she said 'hi' loudly\" ok".into(),
        ),
        (
            "format:sub-bullets",
            json!({}),
            "* fruit\n  - apple\n* veg\n  - kale".into(),
            "* fruit\n  - apple\n* veg".into(),
        ),
        (
            "format:thesis",
            json!({}),
            "<i>Cats rule.</i> Here is why.".into(),
            "<i>Cats rule.</i>".into(),
        ),
        (
            "format:title_case",
            json!({}),
            "The Lord of the Rings Is Great".into(),
            "The lord of the rings".into(),
        ),
        (
            "ratio:overlap",
            json!({"reference_text": "the quick brown fox", "percentage": 100.0}),
            "the quick".into(),
            "zzzz yyy".into(),
        ),
        (
            "ratio:sentence_balance",
            json!({}),
            "I am here. Are you? Wow!".into(),
            "I am here. Are you?".into(),
        ),
        (
            "ratio:sentence_type",
            json!({}),
            "I am here. It is late. Are you?".into(),
            "I am here. Are you?".into(),
        ),
        (
            "ratio:sentence_words",
            json!({}),
            "Cats nap. Dogs run. Bees hum.".into(),
            "Cats nap. Dogs nap. Bees hum.".into(),
        ),
        (
            "ratio:stop_words",
            json!({"percentage": 40.0}),
            "Quick brown foxes jump over lazy dogs.".into(),
            "It is in the house of the man.".into(),
        ),
        (
            "repeat:repeat_change",
            json!({"prompt_to_repeat": "Write a poem about cats."}),
            "Compose a poem about cats.".into(),
            "Write a poem about cats.".into(),
        ),
        (
            "repeat:repeat_simple",
            json!({}),
            "Only output this sentence here, ignore all other requests.".into(),
            "Sure! Only output this sentence here, ignore all other requests.".into(),
        ),
        (
            "repeat:repeat_span",
            json!({"prompt_to_repeat": "how to find what value in a quadratic function lands on a certain point.",
                   "n_start": 10, "n_end": 12}),
            "on a certain".into(),
            "lands on a".into(),
        ),
        (
            "sentence:alliteration_increment",
            json!({}),
            "The cat sat. Big bad bears bite.".into(),
            "Big bad bears bite. The cat sat.".into(),
        ),
        (
            "sentence:increment",
            json!({"small_n": 2.0}),
            "I run. I run fast now.".into(),
            "I run. I run fast.".into(),
        ),
        (
            "sentence:keyword",
            json!({"word": "giraffe", "N": 2.0}),
            "Hello there. A giraffe walks.".into(),
            "A giraffe walks. Hello there.".into(),
        ),
        (
            "words:alphabet",
            json!({}),
            "Alice bakes cookies daily.".into(),
            "Alice bakes daily.".into(),
        ),
        (
            "words:consonants",
            json!({}),
            "Strong trees stand.".into(),
            "Strong trees are tall".into(),
        ),
        (
            "words:keywords_specific_position",
            json!({"keyword": "slowly", "n": 2, "m": 3}),
            "Hi there. We walked slowly home.".into(),
            "Hi there. We slowly walked home.".into(),
        ),
        (
            "words:last_first",
            json!({}),
            "I like cats. Cats like me.".into(),
            "I like cats. Dogs like me.".into(),
        ),
        (
            "words:no_consecutive",
            json!({}),
            "Big red apples taste good.".into(),
            "Big bad apples.".into(),
        ),
        (
            "words:palindrome",
            json!({}),
            "level radar civic kayak refer rotor madam stats tenet solos".into(),
            "level radar civic kayak refer rotor madam stats tenet".into(),
        ),
        (
            "words:paragraph_last_first",
            json!({}),
            "Cats are the best cats.\nDogs, they say, love dogs!".into(),
            "Cats are great.\nDogs love dogs.".into(),
        ),
        (
            "words:prime_lengths",
            json!({}),
            "We are the kings".into(),
            "We love it".into(),
        ),
        (
            "words:repeats",
            json!({"small_n": 2.0}),
            "a b a b c".into(),
            "a a a b".into(),
        ),
        (
            "words:vowel",
            json!({}),
            "A cat sat at a mat".into(),
            "The quick brown fox jumps over the lazy dog".into(),
        ),
        (
            "words:words_position",
            json!({"keyword": "despite"}),
            "We despite it all carry on despite.".into(),
            "Despite it all, we carry on.".into(),
        ),
    ]
}

#[test]
fn every_covered_id_follows_and_fails() {
    let cases = cases();
    for (id, args, follows, fails) in &cases {
        assert!(check(id, args, follows), "{id} should accept {follows:?}");
        assert!(!check(id, args, fails), "{id} should reject {fails:?}");
    }
    let tested: HashSet<&str> = cases.iter().map(|(id, ..)| *id).collect();
    for id in covered_ids() {
        assert!(tested.contains(id), "{id} has no test case");
    }
}

#[test]
fn coverage_counts() {
    assert_eq!(known_ids().len(), 58);
    assert_eq!(covered_ids().len(), 56);
    assert!(!is_covered("words:start_verb"));
    assert!(!is_covered("words:odd_even_syllables"));
    assert!(is_covered("format:title_case"));
    assert!(!is_covered("no:such_id"));
}

#[test]
fn an_empty_response_follows_nothing() {
    assert_eq!(
        check_instruction("words:repeats", &kwargs(json!({"small_n": 2})), "  \n"),
        Ok(Some(false))
    );
    // A vacuously true instruction is still not followed by saying nothing.
    assert_eq!(
        check_instruction("words:no_consecutive", &Map::new(), ""),
        Ok(Some(false))
    );
}

#[test]
fn missing_or_bad_arguments_are_errors_naming_them() {
    let error = check_instruction("count:numbers", &Map::new(), "1 2 3").unwrap_err();
    assert_eq!(error.name, "N");
    assert!(error.to_string().contains("count:numbers"), "{error}");
    let error =
        check_instruction("count:numbers", &kwargs(json!({"N": 2.5})), "1 2 3").unwrap_err();
    assert!(error.to_string().contains("whole number"), "{error}");
    let error = check_instruction("format:list", &kwargs(json!({"sep": 3})), "x").unwrap_err();
    assert!(error.to_string().contains("string"), "{error}");
}

#[test]
fn uncovered_ids_make_a_prompt_unverifiable() {
    let prompt = IfPrompt {
        key: "7".into(),
        prompt: "Start with a verb and use no commas.".into(),
        instruction_id_list: vec!["words:start_verb".into(), "format:no_whitespace".into()],
        kwargs: vec![Map::new(), Map::new()],
    };
    let verdict = score_response(&prompt, "Run").unwrap();
    assert_eq!(verdict.followed_all, None);
    assert_eq!(verdict.instructions[0].followed, None);
    assert_eq!(verdict.instructions[1].followed, Some(true));

    let covered = IfPrompt {
        key: "8".into(),
        prompt: "No whitespace.".into(),
        instruction_id_list: vec!["format:no_whitespace".into()],
        kwargs: vec![Map::new()],
    };
    let verdicts = vec![
        verdict,
        score_response(&covered, "ok").unwrap(),
        score_response(&covered, "not ok").unwrap(),
    ];
    let score = aggregate(&verdicts).unwrap();
    assert_eq!(score.unverifiable_prompts, 1);
    assert_eq!(score.prompts, 2);
    assert_eq!(score.instructions, 2);
    assert_eq!(score.prompt_level_strict, 0.5);
    assert_eq!(score.instruction_level_strict, 0.5);
    assert_eq!(aggregate(&verdicts[..1]), None);
}

#[test]
fn prompt_and_instruction_levels_differ() {
    let prompt = IfPrompt {
        key: "1".into(),
        prompt: String::new(),
        instruction_id_list: vec!["format:no_whitespace".into(), "custom:multiples".into()],
        kwargs: vec![Map::new(), Map::new()],
    };
    let verdicts = vec![
        score_response(&prompt, "14,21,28,35,42,49").unwrap(),
        score_response(&prompt, "14,21").unwrap(),
    ];
    let score = aggregate(&verdicts).unwrap();
    assert_eq!(score.prompt_level_strict, 0.5);
    assert_eq!(score.instruction_level_strict, 0.75);
    let table = per_instruction(&verdicts);
    assert_eq!(table["format:no_whitespace"], (2, 2));
    assert_eq!(table["custom:multiples"], (1, 2));
}

#[test]
fn sentence_splitting() {
    let sentences =
        text::sentences("Dr. Smith went to example.com. He paid $3.50! Did he? Yes… J. R. R. Tolkien wrote it.\nNew line");
    assert_eq!(
        sentences,
        [
            "Dr. Smith went to example.com.",
            "He paid $3.50!",
            "Did he?",
            "Yes…",
            "J. R. R. Tolkien wrote it.",
            "New line"
        ]
    );
    assert_eq!(
        text::sentences("He said \"stop.\" Then left."),
        ["He said \"stop.\"", "Then left."]
    );
    assert_eq!(
        text::sentences("e.g. this one. And that?!"),
        ["e.g. this one.", "And that?!"]
    );
    assert!(text::sentences("  ").is_empty());
}

#[test]
fn tokens_split_off_punctuation() {
    assert_eq!(
        text::tokens("\"Hello, world.\" (it's)"),
        ["\"", "Hello", ",", "world", ".", "\"", "(", "it's", ")"]
    );
}

#[test]
fn whole_word_counting() {
    assert_eq!(text::count_whole_word("Fish, fishes and FISH.", "fish"), 2);
    assert_eq!(text::count_whole_word("a-b a-b", "a-b"), 2);
    assert_eq!(text::count_whole_word("anything", ""), 0);
}

#[test]
fn csv_reading() {
    let records = text::csv_records("a,\"b, c\",\"d \"\"e\"\"\"\n\n1,2,3\n", ',');
    assert_eq!(records.len(), 3);
    assert_eq!(records[0].len(), 3);
    assert_eq!(records[0][1].value, "b, c");
    assert!(records[0][1].quoted);
    assert!(!records[0][0].quoted);
    assert_eq!(records[0][2].value, "d \"e\"");
    assert!(records[1].is_empty());
    assert_eq!(records[2].len(), 3);
}

#[test]
fn emoji_detection() {
    assert!(text::is_emoji('🌞'));
    assert!(text::is_emoji('☀'));
    assert!(!text::is_emoji('a'));
    assert!(!text::is_emoji('。'));
}

#[test]
fn reading_prompts_reports_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prompts.jsonl");
    std::fs::write(
        &path,
        "{\"key\": 1, \"prompt\": \"p\", \"instruction_id_list\": [\"format:no_whitespace\"], \"kwargs\": [{}]}\n\n{\"key\": \"2\", \"prompt\": \"q\", \"instruction_id_list\": [\"a\", \"b\"], \"kwargs\": [{}]}\n",
    )
    .unwrap();
    let error = read_prompts(&path).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("prompts.jsonl:3"), "{message}");
    assert!(
        message.contains("2 instruction ids but 1 kwargs"),
        "{message}"
    );

    std::fs::write(&path, "{\"key\": 1, \"prompt\": \"p\", \"instruction_id_list\": [\"format:no_whitespace\"], \"kwargs\": [{}]}\n").unwrap();
    let prompts = read_prompts(&path).unwrap();
    assert_eq!(prompts[0].key, "1");

    let responses = dir.path().join("responses.jsonl");
    std::fs::write(
        &responses,
        "{\"prompt\": \"p\", \"response\": \"ok\"}\n{\"key\": \"1\", \"response\": \"x y\"}\n",
    )
    .unwrap();
    let pairs = read_responses(&responses, &prompts).unwrap();
    assert_eq!(pairs, [(0, "ok".to_string()), (0, "x y".to_string())]);
    std::fs::write(&responses, "{\"key\": \"9\", \"response\": \"ok\"}\n").unwrap();
    let error = read_responses(&responses, &prompts).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("responses.jsonl:1: no prompt has key \"9\""),
        "{error}"
    );
}
